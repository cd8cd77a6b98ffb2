"""The operator commands: results_deadletters, results_inbox_cleanup and run_pending_jobs.

In-process through ``call_command`` where the output is what matters, and as real processes where
a terminal, a signal or another process's view of the database is what matters.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pika
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from consumer import topology
from consumer.config import Settings
from consumer.decode import decode
from oioioi.evalmgr.models import QueuedJob
from oioioi.workers import store
from oioioi.workers.dispatch import get_dispatcher
from oioioi.workers.models import DeadLetter, PendingRun, ReceivedResult
from tests.conftest import ROOT, BrokerClient, process_env, result_for
from tests.helpers import wait_until
from tests.recipeapp.models import StepLog

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dlq(project_queues: Settings) -> Settings:
    """Point the project's settings at this test's queues, and declare them."""
    queue_settings = project_queues
    conn = pika.BlockingConnection(pika.URLParameters(queue_settings.amqp_url))
    topology.declare(conn.channel(), queue_settings)
    conn.close()
    return queue_settings


def dead_letter(
    settings: Settings, letter_id: str, reason: str, body: dict[str, Any] | bytes
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    props = pika.BasicProperties(
        message_id=f"msg-{letter_id}",
        delivery_mode=2,
        headers={
            "x-oioioi-dead-letter-id": letter_id,
            "x-oioioi-reason": reason,
            "x-oioioi-error": f"it went wrong ({reason})",
            "x-oioioi-error-class": "consumer.errors.InvalidEnviron",
            "x-oioioi-failed-at": (timezone.now() - timedelta(minutes=5)).isoformat(),
        },
    )
    ch.basic_publish("", settings.dead_letter_queue, raw, props, mandatory=True)
    conn.close()


def three(settings: Settings) -> None:
    dead_letter(settings, "a1", "invalid", {"job_id": "job-a", "group_id": "grp-a", "x": 1})
    dead_letter(settings, "b2", "failed", {"job_id": "job-b", "group_id": "grp-b"})
    dead_letter(settings, "c3", "undecodable", b"\x80\x81 not text")


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("results_deadletters", *args, stdout=out, stderr=out)
    return out.getvalue()


def ids_in(settings: Settings) -> list[str]:
    out = run("list", "--json")
    return [row["id"] for row in json.loads(out)]


# --- results_deadletters: reading --------------------------------------------------------------


def test_list_prints_a_table_and_json(dlq):
    three(dlq)
    table = run("list")
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "REASON", "AGE", "JOB", "GROUP", "SIZE"]
    assert lines[1].split()[:5] == ["a1", "invalid", "5m", "job-a", "grp-a"]
    assert lines[2].split()[:2] == ["b2", "failed"]
    assert lines[3].split() == ["c3", "undecodable", "5m", "-", "-", "11"]
    assert lines[-1] == "3 dead letter(s)."

    rows = json.loads(run("list", "--json"))
    assert [r["id"] for r in rows] == ["a1", "b2", "c3"]
    assert rows[0]["job_id"] == "job-a" and rows[0]["reason"] == "invalid"
    assert 290 < rows[0]["age_seconds"] < 400
    assert [r["id"] for r in json.loads(run("list", "--json", "--reason", "failed"))] == ["b2"]
    assert [r["id"] for r in json.loads(run("list", "--json", "--limit", "2"))] == ["a1", "b2"]
    # Listing changed nothing.
    assert ids_in(dlq) == ["a1", "b2", "c3"]


def test_list_of_an_empty_queue(dlq):
    assert "No dead letters" in run("list")
    assert json.loads(run("list", "--json")) == []


def test_show_prints_headers_and_the_pretty_body(dlq):
    three(dlq)
    out = run("show", "a1")
    assert "Reason:        invalid" in out
    assert "Error:         it went wrong (invalid)" in out
    assert "Job id:        job-a" in out
    headers = out.split("Headers:\n")[1].split("Body:\n")[0]
    assert json.loads(headers)["x-oioioi-reason"] == "invalid"
    body = out.split("Body:\n")[1]
    assert json.loads(body) == {"job_id": "job-a", "group_id": "grp-a", "x": 1}
    assert '\n  "group_id": "grp-a",' in body  # pretty-printed
    assert "b'\\x80\\x81 not text'" in run("show", "c3")
    with pytest.raises(CommandError, match="No dead letter with id 'zz'"):
        run("show", "zz")


def test_startup_problems_are_command_errors(dlq, settings):
    settings.RESULTS_DEAD_LETTER_QUEUE = dlq.dead_letter_queue + ".missing"
    with pytest.raises(CommandError, match="does not exist"):
        run("list")
    settings.AMQP_URL = "amqp://guest:secret-pw@127.0.0.1:1/%2F"
    with pytest.raises(CommandError, match=r"cannot be reached.*node 127\.0\.0\.1:1") as caught:
        run("list")
    assert "secret-pw" not in str(caught.value)
    # A malformed list of broker URLs is refused before anything connects
    settings.AMQP_URL = "amqp://guest:secret-pw@127.0.0.1:1/%2F;;amqp://guest:secret-pw@h2/"
    with pytest.raises(CommandError, match="entry 2 of 3 is empty") as caught:
        run("list")
    assert "secret-pw" not in str(caught.value)


# --- results_deadletters: changing -------------------------------------------------------------


def test_replay_one_with_yes(dlq):
    three(dlq)
    out = run("replay", "b2", "--yes")
    assert "Replayed 1, failed 0." in out
    assert ids_in(dlq) == ["a1", "c3"]
    [(props, body)] = BrokerClient(dlq).drain(dlq.queue)
    assert json.loads(body)["job_id"] == "job-b"
    assert props.message_id == "msg-b2"
    assert props.headers.get("x-oioioi-replays") == 1
    assert not [h for h in props.headers if h.startswith("x-oioioi-") and h != "x-oioioi-replays"]


def test_replay_all_by_reason_shows_progress(dlq):
    for i in range(40):
        dead_letter(dlq, f"id{i:02d}", "failed" if i % 4 == 0 else "invalid", {"job_id": str(i)})
    out = run("replay", "--all", "--reason", "failed", "--yes")
    assert "Replaying: 10/10 dead letters." in out
    assert "Replayed 10, failed 0." in out
    assert len(ids_in(dlq)) == 30
    assert BrokerClient(dlq).depth(dlq.queue) == 10


def test_replay_needs_ids_or_all_and_reports_what_is_missing(dlq):
    three(dlq)
    with pytest.raises(CommandError, match="or --all"):
        run("replay", "--yes")
    with pytest.raises(CommandError, match="or --all"):
        run("replay", "a1", "--all", "--yes")
    out = run("replay", "a1", "nope", "--yes")
    assert "Replayed 1" in out and "No dead letter with id 'nope'" in out


def test_failed_replay_is_an_error_and_leaves_the_message(dlq):
    three(dlq)
    conn = pika.BlockingConnection(pika.URLParameters(dlq.amqp_url))
    conn.channel().queue_delete(dlq.queue)  # nothing bound to the exchange: unroutable
    conn.close()
    with pytest.raises(CommandError, match="could not be replayed"):
        run("replay", "a1", "--yes")
    assert ids_in(dlq) == ["a1", "b2", "c3"]


def test_changes_are_refused_without_a_terminal_or_yes(dlq):
    three(dlq)
    for args in (("replay", "a1"), ("replay", "--all"), ("discard", "a1"), ("purge",)):
        with pytest.raises(CommandError, match="--yes"):
            run(*args)
    assert ids_in(dlq) == ["a1", "b2", "c3"]


def test_discard_and_purge_with_yes(dlq):
    three(dlq)
    assert "Discarded 2 dead letter(s)." in run("discard", "a1", "c3", "--yes")
    assert ids_in(dlq) == ["b2"]
    assert "Purged 1 dead letter(s)." in run("purge", "--yes")
    assert ids_in(dlq) == []


def interactive(settings: Settings, args: list[str], answer: str) -> tuple[int, str]:
    """Run the command on a real terminal (a pty) and type ``answer`` at its question."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "results_deadletters", *args],
        cwd=ROOT,
        env=process_env(settings),
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    output = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not answered and b"[y/N]" in output:
                os.write(primary, answer.encode() + b"\n")
                answered = True
        elif proc.poll() is not None:
            break
    code = proc.wait(30)
    os.close(primary)
    return code, output.decode(errors="replace")


def test_purge_asks_on_a_terminal(dlq):
    three(dlq)
    code, out = interactive(dlq, ["purge"], "n")
    assert "Delete all 3 dead letter(s)" in out and "Cancelled" in out
    assert code != 0
    assert ids_in(dlq) == ["a1", "b2", "c3"]
    code, out = interactive(dlq, ["purge"], "yes")
    assert code == 0, out
    assert "Purged 3 dead letter(s)." in out
    assert ids_in(dlq) == []


# --- results_inbox_cleanup ---------------------------------------------------------------------


def inbox_row(key: str, days_old: float) -> None:
    ReceivedResult.objects.create(
        key=key, outcome="resumed", received_at=timezone.now() - timedelta(days=days_old)
    )


def test_inbox_cleanup_deletes_old_records_in_chunks(settings):
    for i in range(5):
        inbox_row(f"old-{i}", 40)
    inbox_row("middle", 15)
    inbox_row("new", 1)
    out = io.StringIO()
    settings.RESULTS_INBOX_RETENTION_DAYS = 30
    call_command("results_inbox_cleanup", "--chunk-size", "2", "-v", "2", stdout=out)
    assert "Deleted 5 received-result record(s) older than 30 day(s)" in out.getvalue()
    assert "Deleted 4 so far." in out.getvalue()  # chunks of two
    assert sorted(ReceivedResult.objects.values_list("key", flat=True)) == ["middle", "new"]
    out = io.StringIO()
    call_command("results_inbox_cleanup", "--days", "10", stdout=out)
    assert "Deleted 1 received-result record(s) older than 10 day(s)" in out.getvalue()
    assert list(ReceivedResult.objects.values_list("key", flat=True)) == ["new"]
    with pytest.raises(CommandError):
        call_command("results_inbox_cleanup", "--days", "-1")


def test_inbox_cleanup_drops_old_attempt_counts_too(settings):
    from oioioi.workers.models import DeliveryAttempt

    DeliveryAttempt.objects.create(
        key="old", attempts=3, last_attempt_at=timezone.now() - timedelta(days=40)
    )
    DeliveryAttempt.objects.create(key="recent", attempts=1)
    # Replayed dead letters are remembered as long as the inbox is; waiting ones are kept.
    long_ago = timezone.now() - timedelta(days=40)
    DeadLetter.objects.create(
        letter_id="old-replayed", reason="failed", settled="replayed", settled_at=long_ago
    )
    DeadLetter.objects.create(
        letter_id="new-replayed", reason="failed", settled="replayed", settled_at=timezone.now()
    )
    DeadLetter.objects.create(letter_id="old-waiting", reason="failed", archived_at=long_ago)
    out = io.StringIO()
    call_command("results_inbox_cleanup", "--days", "30", stdout=out)
    assert "1 old delivery-attempt count(s)" in out.getvalue()
    assert "1 old replayed or discarded dead letter(s)" in out.getvalue()
    assert list(DeliveryAttempt.objects.values_list("key", flat=True)) == ["recent"]
    assert sorted(DeadLetter.objects.values_list("letter_id", flat=True)) == [
        "new-replayed",
        "old-waiting",
    ]


# --- run_pending_jobs --------------------------------------------------------------------------


def abandoned_runs(waiting_job, count: int = 1) -> list[str]:
    """Committed resumes whose runner died: PendingRuns nobody holds (job ids returned)."""
    # All jobs first: making a job runs what is pending in this process, which must not run these.
    jobs = [waiting_job() for _ in range(count)]
    for sent in jobs:
        result = result_for(sent)
        body = json.dumps(result).encode()
        assert store.write([decode(body, result["group_id"])]) == ["committed"]
    # This process plays the runner that died: it forgets its in-memory hand-off, so that no
    # later test in it runs these rows.
    get_dispatcher()._ready.clear()  # type: ignore[attr-defined]
    # As a runner killed mid-recipe leaves them: claimed, the lease expired.
    PendingRun.objects.update(
        claimed_by="dead-host:1:abc", claimed_until=timezone.now() - timedelta(seconds=1)
    )
    assert PendingRun.objects.count() == count
    return [sent["job_id"] for sent in jobs]


def job_done(job_id: str) -> bool:
    return (
        StepLog.objects.filter(job_id=job_id).exists()
        and not QueuedJob.objects.filter(job_id=job_id).exists()
        and not PendingRun.objects.filter(job_id=job_id).exists()
    )


def sweeper(queue_settings: Settings, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "run_pending_jobs", *args],
        cwd=ROOT,
        env=process_env(queue_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_run_pending_jobs_once_runs_an_abandoned_run(waiting_job, queue_settings):
    job_ids = abandoned_runs(waiting_job, 3)
    proc = sweeper(queue_settings, "--once")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Ran 3 pending run(s)." in out
    assert all(job_done(job_id) for job_id in job_ids)
    assert StepLog.objects.count() == 3


def test_run_pending_jobs_loop_picks_up_runs_and_stops_on_sigterm(waiting_job, queue_settings):
    proc = sweeper(queue_settings, "--interval", "0.3")
    try:
        time.sleep(1.0)
        [job_id] = abandoned_runs(waiting_job)
        wait_until(lambda: job_done(job_id), timeout=60, what="the sweeper ran the job")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Ran 1 pending run(s)." in out
    assert "Sweeper stopped." in out
    assert StepLog.objects.filter(job_id=job_id).count() == 1
