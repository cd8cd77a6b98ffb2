"""results_dead_letters: reading the dead letters from the headers, then every operation against a
real broker (both queue types), with dead letters the real consumer made where it matters."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pika
import pytest

from consumer import topology
from consumer.config import Settings
from oioioi.evalmgr.models import SavedEnviron
from oioioi.workers.models import ReceivedResult
from results_dead_letters import passes
from results_dead_letters.errors import TopologyMismatch, TopologyMissing
from results_dead_letters.letters import from_message, replay_properties
from tests.conftest import ROOT, BrokerClient, make_settings, result_for
from tests.helpers import job_done, wait_until
from tests.recipeapp.models import StepLog

QUEUE_TYPES = ["classic", "quorum"]


def channel(settings: Settings) -> tuple[pika.BlockingConnection, Any]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    topology.declare(ch, settings)
    return conn, ch


def headers_of(i: int, reason: str = "invalid") -> dict[str, Any]:
    return {
        "x-oioioi-dead-letter-id": f"dl-{i:05d}",
        "x-oioioi-reason": reason,
        "x-oioioi-error": f"error {i}",
        "x-oioioi-failed-at": "2026-01-02T03:04:05+00:00",
        "x-oioioi-retries": 1,
        "x-oioioi-delivery-count": 1,
        "x-oioioi-host": "here",
        "x-death-free": i,
    }


def fill(settings: Settings, count: int, reason=lambda i: "invalid") -> list[str]:
    """Put ``count`` dead letters straight into the dead-letter queue; returns their ids."""
    conn, ch = channel(settings)
    ids = []
    try:
        for i in range(count):
            ids.append(f"dl-{i:05d}")
            headers = headers_of(i, reason(i))
            body = json.dumps({"job_id": f"job-{i}", "group_id": f"g-{i}", "n": i}).encode()
            props = pika.BasicProperties(
                message_id=f"m-{i}",
                delivery_mode=2,
                timestamp=1_700_000_000 + i,
                content_type="application/json",
                headers=headers,
            )
            ch.basic_publish("", settings.dead_letter_queue, body, props, mandatory=True)
    finally:
        conn.close()
    return ids


def contents(broker: BrokerClient, queue: str) -> list[tuple[bytes, str | None, dict]]:
    """Drain ``queue``: what each message was, in order (not the broker's delivery count)."""
    out = []
    for props, body in broker.drain(queue):
        headers = {k: v for k, v in (props.headers or {}).items() if k != "x-delivery-count"}
        out.append((body, props.message_id, headers))
    return out


# --- reading one dead letter (pure) ------------------------------------------------------------


def test_consumer_dead_letter_is_read_from_its_headers():
    props = pika.BasicProperties(
        message_id="g1",
        timestamp=1_700_000_000,
        content_type="application/json",
        headers={
            "x-oioioi-dead-letter-id": "abc",
            "x-oioioi-reason": "failed",
            "x-oioioi-error": "boom",
            "x-oioioi-error-class": "builtins.RuntimeError",
            "x-oioioi-traceback": "Traceback ...",
            "x-oioioi-failed-at": "2026-01-02T03:04:05+00:00",
            "x-oioioi-delivery-count": 3,
            "x-oioioi-retries": 2,
            "x-oioioi-host": "worker-1",
        },
    )
    body = b'{"job_id": "j", "group_id": "g", "submission_id": 7}'
    letter = from_message(props, body)
    assert (letter.id, letter.message_id, letter.reason) == ("abc", "g1", "failed")
    assert (letter.error, letter.error_class, letter.traceback) == (
        "boom",
        "builtins.RuntimeError",
        "Traceback ...",
    )
    assert letter.failed_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (letter.delivery_count, letter.retries, letter.host) == (3, 2, "worker-1")
    assert (letter.job_id, letter.group_id, letter.submission_id) == ("j", "g", 7)
    assert (letter.size, letter.body, letter.content_type) == (len(body), body, "application/json")
    assert letter.age_seconds(now=letter.failed_at.timestamp() + 90) == 90
    json.dumps(letter.summary())


def test_broker_dead_letter_gets_its_reason_time_and_a_stable_id_from_x_death():
    death_time = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    headers = {
        "x-death": [
            {
                "count": 1,
                "reason": "delivery_limit",
                "queue": "oioioi.workers.results",
                "time": death_time,
                "exchange": "oioioi.workers",
                "routing-keys": ["results"],
            }
        ],
        "x-first-death-reason": "delivery_limit",
        "x-delivery-count": 0,
        # What a retry before the crash loop left; the broker's reason wins.
        "x-oioioi-retries": 1,
        "x-oioioi-failed-at": "2020-01-01T00:00:00+00:00",
    }
    first = from_message(pika.BasicProperties(headers=headers), b"{}")
    assert first.reason == "delivery-limit"
    assert first.failed_at == death_time
    assert len(first.id) == 32
    # The broker's own delivery count changes between reads; the id does not.
    again = from_message(
        pika.BasicProperties(headers={**headers, "x-delivery-count": 5}), b"{}"
    )
    assert again.id == first.id
    other = from_message(pika.BasicProperties(headers=headers), b"{ }")
    assert other.id != first.id


@pytest.mark.parametrize(
    "body", [b"\x80\xff", b"not json", b"[1, 2]", b'{"job_id": 5, "submission_id": true}', b""]
)
def test_odd_bodies_and_headers_never_raise(body):
    props = pika.BasicProperties(
        headers={"x-oioioi-reason": b"\xffbytes", "x-death": "not a list", "x-oioioi-retries": "x"}
    )
    letter = from_message(props, body)
    assert (letter.job_id, letter.group_id, letter.submission_id) == (None, None, None)
    assert letter.retries is None
    assert letter.reason == "\ufffdbytes"
    assert from_message(None, body).reason == "unknown"


def test_replay_properties_drop_the_failure_and_count_the_replay():
    original = pika.BasicProperties(
        message_id="g1",
        correlation_id="c",
        app_id="a",
        timestamp=1_700_000_000,
        content_type="application/json",
        user_id="someone-else",
        delivery_mode=1,
        headers={
            "x-oioioi-reason": "failed",
            "x-oioioi-dead-letter-id": "abc",
            "x-oioioi-retries": 5,
            "x-oioioi-replays": 2,
            "x-death": [{"queue": "q"}],
            "x-first-death-queue": "q",
            "x-delivery-count": 4,
            "trace": "kept",
        },
    )
    props = replay_properties(original)
    assert props.headers == {"trace": "kept", "x-oioioi-replays": 3}
    assert (props.message_id, props.correlation_id, props.app_id) == ("g1", "c", "a")
    assert (props.timestamp, props.content_type) == (1_700_000_000, "application/json")
    assert props.delivery_mode == 2
    assert props.user_id is None


# --- against the broker ------------------------------------------------------------------------


@pytest.fixture(params=QUEUE_TYPES)
def typed(request, amqp_url) -> tuple[Settings, BrokerClient]:
    settings = make_settings(amqp_url, queue_type=request.param)
    return settings, BrokerClient(settings)


def test_browsing_leaves_the_queue_as_it_was(typed):
    settings, broker = typed
    # More than 32: a quorum queue requeues bigger batches of returns in hash order.
    ids = fill(settings, 120)
    expected = [
        (
            json.dumps({"job_id": f"job-{i}", "group_id": f"g-{i}", "n": i}).encode(),
            f"m-{i}",
            headers_of(i),
        )
        for i in range(120)
    ]

    first = passes.browse(settings)
    second = passes.browse(settings)
    middle = passes.get(settings, first[60].id)
    head = passes.browse(settings, limit=7)
    wanted = {first[3].id, first[100].id, "nope"}
    found = [d for d in passes.browse(settings) if d.id in wanted]

    assert [d.id for d in first] == ids
    assert [d.id for d in second] == [d.id for d in first]
    assert middle is not None and middle.body == first[60].body
    assert [d.id for d in head] == [d.id for d in first[:7]]
    assert [d.id for d in found] == [first[3].id, first[100].id]
    assert passes.get(settings, "no-such-id") is None
    assert broker.depth(settings.dead_letter_queue) == 120
    assert contents(broker, settings.dead_letter_queue) == expected


def test_browse_reads_what_fill_wrote(typed):
    settings, _broker = typed
    ids = fill(settings, 3, reason=lambda i: ["invalid", "failed", "rejected"][i])
    letters = passes.browse(settings)
    assert [d.id for d in letters] == ids
    assert [d.reason for d in letters] == ["invalid", "failed", "rejected"]
    assert [d.job_id for d in letters] == ["job-0", "job-1", "job-2"]
    assert [d.message_id for d in letters] == ["m-0", "m-1", "m-2"]
    assert passes.depth(settings) == 3


def test_replay_by_reason_and_discard_keep_the_rest_in_order(typed):
    settings, broker = typed
    ids = fill(settings, 90, reason=lambda i: "failed" if i % 3 == 0 else "invalid")
    calls: list[tuple[int, int]] = []

    report = passes.replay(
        settings, reason="failed", progress=lambda done, total: calls.append((done, total))
    )

    assert (report.replayed, report.skipped, report.failed) == (30, 60, 0)
    assert calls[-1] == (90, 90) and len(calls) == 90
    replayed = contents(broker, settings.queue)
    assert [json.loads(b)["n"] for b, _, _ in replayed] == list(range(0, 90, 3))
    assert [m for _, m, _ in replayed] == [f"m-{i}" for i in range(0, 90, 3)]
    # The failure's headers are gone, the replay is counted.
    assert all(
        h == {"x-death-free": json.loads(b)["n"], "x-oioioi-replays": 1} for b, _, h in replayed
    )

    kept = [i for i in range(90) if i % 3]
    assert passes.discard(settings, [ids[1], ids[2], ids[89], "no-such-id"]) == 3
    left = [d.id for d in passes.browse(settings)]
    assert left == [ids[i] for i in kept if i not in (1, 2, 89)]


def test_replay_selected_ids_and_limit(typed):
    settings, broker = typed
    ids = fill(settings, 10)
    report = passes.replay(settings, [ids[7], ids[2], "gone"])
    assert (report.replayed, report.skipped, report.failed) == (2, 8, 0)
    assert report.not_found == ["gone"]
    report = passes.replay(settings, limit=3)
    assert report.replayed == 3
    assert [json.loads(b)["n"] for b, _, _ in contents(broker, settings.queue)] == [2, 7, 0, 1, 3]
    assert [d.id for d in passes.browse(settings)] == [ids[i] for i in (4, 5, 6, 8, 9)]


def test_a_pass_cut_short_loses_nothing(typed):
    settings, broker = typed
    ids = fill(settings, 100)

    def crash(done: int, total: int) -> None:
        if done == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        passes.replay(settings, progress=crash)

    # Replayed ones are in the results queue, the rest still dead-lettered; at worst both.
    replayed = {f"dl-{json.loads(b)['n']:05d}" for b, _, _ in contents(broker, settings.queue)}
    still = {
        h["x-oioioi-dead-letter-id"] for _, _, h in contents(broker, settings.dead_letter_queue)
    }
    assert len(replayed) == 50
    assert replayed | still == set(ids)


KILLED_REPLAY = """
import os, sys
from results_dead_letters import passes
from consumer.config import Settings
settings = Settings(**{k: v for k, v in json.loads(sys.argv[1]).items()})
def die(done, total):
    if done == 30:
        os._exit(137)
passes.replay(settings, progress=die)
"""


def test_a_replay_killed_midway_loses_nothing(typed):
    settings, broker = typed
    ids = fill(settings, 80)
    args = json.dumps(dataclasses.asdict(settings))
    proc = subprocess.run(
        [sys.executable, "-c", "import json\n" + KILLED_REPLAY, args],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 137, proc.stderr
    # The broker requeues what the dead connection held in the background.
    wait_until(
        lambda: broker.depth(settings.queue) + broker.depth(settings.dead_letter_queue) >= 80,
        what="the killed pass's messages back",
    )
    replayed = [f"dl-{json.loads(b)['n']:05d}" for b, _, _ in contents(broker, settings.queue)]
    still = [
        h["x-oioioi-dead-letter-id"] for _, _, h in contents(broker, settings.dead_letter_queue)
    ]
    assert replayed == ids[:30]
    # (Replaying everything keeps nothing, so not even a quorum queue has moved round.)
    assert still == ids[30:]


def test_unroutable_replay_stays_dead_lettered(typed):
    settings, broker = typed
    ids = fill(settings, 5)
    conn, ch = channel(settings)
    ch.queue_delete(settings.queue)  # the exchange stays, with nothing bound to it
    conn.close()

    report = passes.replay(settings, [ids[2]])

    assert (report.replayed, report.failed) == (0, 1)
    assert report.failures[0][0] == ids[2] and "did not accept" in report.failures[0][1]
    assert [d.id for d in passes.browse(settings)] == ids
    conn, ch = channel(settings)  # the queue is back
    conn.close()
    assert passes.replay(settings, [ids[2]]).replayed == 1
    assert broker.depth(settings.queue) == 1


def test_replay_without_the_results_exchange_changes_nothing(typed):
    settings, _broker = typed
    ids = fill(settings, 3)
    conn, ch = channel(settings)
    ch.exchange_delete(settings.exchange)
    conn.close()
    with pytest.raises(TopologyMissing, match="results exchange"):
        passes.replay(settings)
    assert [d.id for d in passes.browse(settings)] == ids


def test_a_missing_or_mistyped_dead_letter_queue_is_an_error(amqp_url):
    settings = make_settings(amqp_url)
    with pytest.raises(TopologyMissing, match="does not exist"):
        passes.browse(settings)
    with pytest.raises(TopologyMissing):
        passes.purge(settings)
    # Nothing was created by looking.
    with pytest.raises(TopologyMissing):
        passes.depth(settings)
    conn, _ch = channel(settings)  # a quorum dead-letter queue
    conn.close()
    with pytest.raises(TopologyMismatch, match="classic"):
        passes.browse(settings.replace(queue_type="classic"))


def test_purge_and_discard_count(typed):
    settings, broker = typed
    ids = fill(settings, 12)
    assert passes.discard(settings, []) == 0
    assert passes.discard(settings, ids[:2]) == 2
    assert passes.purge(settings) == 10
    assert broker.depth(settings.dead_letter_queue) == 0
    assert passes.browse(settings) == []


def test_thousands_of_dead_letters(amqp_url):
    settings = make_settings(amqp_url)  # quorum: every pass goes round the whole queue
    broker = BrokerClient(settings)
    ids = fill(settings, 2000, reason=lambda i: "failed" if i % 2 else "invalid")
    started = time.monotonic()
    letters = passes.browse(settings)
    browse_seconds = time.monotonic() - started
    started = time.monotonic()
    report = passes.replay(settings, reason="failed")
    replay_seconds = time.monotonic() - started
    print(
        f"2000 dead letters (quorum): browse {browse_seconds:.1f} s, replay {replay_seconds:.1f} s"
    )
    assert [d.id for d in letters] == ids
    assert (report.replayed, report.skipped) == (1000, 1000)
    assert [json.loads(b)["n"] for b, _, _ in contents(broker, settings.queue)] == list(
        range(1, 2000, 2)
    )
    assert [d.id for d in passes.browse(settings)] == ids[::2]


# --- with the real consumer's dead letters ------------------------------------------------------


db = pytest.mark.django_db(transaction=True)


def break_restore(sent: dict[str, Any]) -> SavedEnviron:
    """Make the job's restore function fail, as a bug would: its result gets dead-lettered."""
    saved = SavedEnviron.objects.get(queued_job_id=sent["job_id"])
    env = saved.load_environ()
    env["real_restore"] = env["restore_environ_func"]
    env["restore_environ_func"] = "tests.recipeapp.recipes.no_such_function"
    saved.environ = json.dumps(env)
    saved.save()
    return saved


def fix_restore(saved: SavedEnviron) -> None:
    saved.refresh_from_db()
    env = saved.load_environ()
    env["restore_environ_func"] = env.pop("real_restore")
    saved.environ = json.dumps(env)
    saved.save()


@db
def test_dead_letters_of_the_real_consumer(broker, start_consumer, queue_settings):
    start_consumer()
    broker.publish_raw(b"\x80garbage", pika.BasicProperties(message_id="bad-1", delivery_mode=2))
    broker.publish_raw(b'{"workers_jobs.results": {}, "group_id": "g2"}', None)
    broker.wait_depth(queue_settings.dead_letter_queue, 2)

    undecodable, rejected = passes.browse(queue_settings)

    assert (undecodable.reason, undecodable.message_id) == ("undecodable", "bad-1")
    assert "not UTF-8" in undecodable.error
    assert undecodable.error_class == "consumer.errors.UndecodableMessage"
    assert undecodable.host and undecodable.delivery_count == 1
    assert undecodable.age_seconds() < 60
    assert (rejected.reason, rejected.group_id, rejected.job_id) == ("rejected", "g2", None)
    assert len(rejected.id) == 32
    assert passes.get(queue_settings, rejected.id).body == rejected.body
    assert broker.depth(queue_settings.dead_letter_queue) == 2


@db
def test_replay_after_fixing_the_cause_resumes_the_job(
    broker, start_consumer, waiting_job, queue_settings
):
    # Given a result dead-lettered because the job's restore function was broken
    sent = waiting_job()
    saved = break_restore(sent)
    consumer = start_consumer()
    result = result_for(sent)
    broker.publish_env(result, message_id=result["group_id"])
    broker.wait_depth(queue_settings.dead_letter_queue, 1)
    [letter] = passes.browse(queue_settings)
    assert (letter.reason, letter.retries, letter.job_id) == ("failed", 2, sent["job_id"])
    assert "Traceback" in letter.traceback
    # When the cause is fixed and the dead letter replayed
    fix_restore(saved)
    report = passes.replay(queue_settings, [letter.id])
    # Then the job resumes and runs to the end, and both queues are empty
    assert report.replayed == 1
    wait_until(job_done(sent["job_id"]), what="job resumed by the replay")
    inbox = ReceivedResult.objects.get()
    assert (inbox.key, inbox.outcome) == (result["group_id"], "resumed")
    broker.wait_depth(queue_settings.queue, 0)
    assert broker.depth(queue_settings.dead_letter_queue) == 0
    assert consumer.alive()


@db
def test_replaying_an_applied_result_is_harmless(
    broker, start_consumer, waiting_job, queue_settings
):
    # Given a dead letter held twice (as a pass cut short between confirm and ack leaves it)
    sent = waiting_job()
    saved = break_restore(sent)
    consumer = start_consumer()
    result = result_for(sent)
    broker.publish_env(result, message_id=result["group_id"])
    broker.wait_depth(queue_settings.dead_letter_queue, 1)
    [(props, body)] = broker.drain(queue_settings.dead_letter_queue)
    conn, ch = channel(queue_settings)
    for _ in range(2):
        ch.basic_publish("", queue_settings.dead_letter_queue, body, props, mandatory=True)
    conn.close()
    fix_restore(saved)
    # When both are replayed
    report = passes.replay(queue_settings)
    # Then the result is applied once; the second copy is recognised by the inbox
    assert report.replayed == 2
    wait_until(job_done(sent["job_id"]), what="job resumed")
    consumer.wait_for_log("duplicate")
    broker.wait_depth(queue_settings.queue, 0)
    assert StepLog.objects.filter(job_id=sent["job_id"]).count() == 1
    assert ReceivedResult.objects.count() == 1
    assert broker.depth(queue_settings.dead_letter_queue) == 0


@db
def test_replayed_delivery_limit_dead_letter_survives_the_retry_queue(
    amqp_url, start_consumer, waiting_job
):
    # A result whose consumer kept dying is dead-lettered by the quorum queue (x-death names the
    # results queue). Replayed with x-death kept, a failure through the retry queue would make
    # the broker see a dead-letter cycle back into the results queue and drop it silently.
    settings = make_settings(amqp_url, delivery_limit=1)
    broker = BrokerClient(settings)
    sent = waiting_job()
    saved = break_restore(sent)
    broker.publish_env(result_for(sent), message_id="crashy")
    conn, ch = channel(settings)
    for _ in range(5):  # deliveries that end as a killed consumer's would: back to the queue
        method, _props, _body = ch.basic_get(settings.queue)
        if method is None:
            break
        ch.basic_nack(method.delivery_tag, requeue=True)
    conn.close()
    broker.wait_depth(settings.dead_letter_queue, 1)
    [letter] = passes.browse(settings)
    assert letter.reason == "delivery-limit"
    assert letter.failed_at is not None and letter.message_id == "crashy"
    assert passes.browse(settings)[0].id == letter.id

    start_consumer(settings=settings)
    assert passes.replay(settings, [letter.id]).replayed == 1

    # Retried twice through the retry queue, then dead-lettered by the consumer: not lost.
    wait_until(
        lambda: [d.reason for d in passes.browse(settings)] == ["failed"],
        timeout=30,
        what="the replayed message dead-lettered again",
    )
    [again] = passes.browse(settings)
    assert again.headers["x-oioioi-replays"] == 1
    assert again.retries == 2
    fix_restore(saved)
    passes.replay(settings, [again.id])
    wait_until(job_done(sent["job_id"]), what="job resumed")
