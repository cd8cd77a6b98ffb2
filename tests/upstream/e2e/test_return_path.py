"""The return path inside upstream OIOIOI, end to end.

Jobs are parked by upstream's own evaluation manager (``delay_environ``, ``evalmgr_job``,
``transfer_job`` with ``oioioi.sioworkers.handlers``) in a real Celery worker; their results are
published to the real broker, consumed by a real ``start_receive_from_workers`` process, and the
rest of each recipe is handed back to the Celery worker through the outbox (``PendingRun``,
``run_pending_job``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.utils import timezone
from results_e2e.conftest import job_finished, sent_group, sioworkersd_result, steps, wait_until
from results_e2e.models import StepLog

from consumer.publish import publish
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.models import PendingRun, ReceivedResult

pytestmark = pytest.mark.django_db(transaction=True)

#: A lease short enough that a run a killed consumer held is taken over within the test.
SHORT_LEASE = {"EVALMGR_RUN_LEASE_SECONDS": "3"}


def test_a_parked_job_is_resumed_through_the_queue_and_finished_by_celery(
    start_worker, start_consumer, park_job, broker, run_settings
):
    worker = start_worker()
    consumer = start_consumer()
    # Given a job parked by upstream's evaluation manager, in the Celery worker
    env = park_job()
    sent = sent_group(env["job_id"])
    assert sent["pid"] == worker.pid
    assert "recipe" not in sent and "error_handlers" not in sent  # upstream's transfer_job
    job = QueuedJob.objects.get(job_id=env["job_id"])
    assert job.state == "WAITING"
    assert SavedEnviron.objects.filter(pk=sent["saved_environ_id"], queued_job=job).exists()

    # When sioworkers' result is published to the queue
    result = sioworkersd_result(sent)
    publish(result, run_settings)

    # Then the consumer resumes the job, and the Celery worker runs the rest of its recipe once
    wait_until(job_finished(env["job_id"]), what="the job to finish")
    assert steps(env["job_id"]) == [("after-results", worker.pid)]
    detail = json.loads(StepLog.objects.get(job_id=env["job_id"]).detail)
    assert detail["job0"]["pong"] == env["job_id"]
    inbox = ReceivedResult.objects.get()
    assert (inbox.key, inbox.job_id, inbox.outcome) == (
        result["group_id"],
        env["job_id"],
        "resumed",
    )
    assert not SavedEnviron.objects.exists()
    assert not PendingRun.objects.exists()
    assert "oioioi.workers.tasks.run_pending_job" in worker.log
    broker.wait_depth(run_settings.queue, 0)
    assert broker.depth(run_settings.dead_letter_queue) == 0
    assert consumer.stop() == 0


@pytest.mark.parametrize(
    ("body", "reason", "error"),
    [
        pytest.param(b"{not json", "undecodable", "not JSON", id="not-json"),
        pytest.param(
            b'{"workers_jobs.results": {"job0": {}}}', "rejected", "no 'job_id'", id="no-job-id"
        ),
        pytest.param(
            b'{"workers_jobs.results": {"job0": {}}, "job_id": "j"}',
            "no-saved-environ",
            "no 'saved_environ_id'",
            id="no-saved-environ",
        ),
    ],
)
def test_a_poison_message_is_dead_lettered_with_its_reason(
    start_consumer, broker, run_settings, body, reason, error
):
    consumer = start_consumer()
    broker.publish_raw(body, message_id="poison")
    broker.wait_depth(run_settings.dead_letter_queue, 1)
    [(props, dead_body)] = broker.drain(run_settings.dead_letter_queue)
    assert dead_body == body
    assert props.message_id == "poison"
    assert props.headers["x-oioioi-reason"] == reason
    assert error in props.headers["x-oioioi-error"]
    assert props.headers["x-oioioi-error-class"].startswith("consumer.errors.")
    assert props.delivery_mode == 2
    assert broker.depth(run_settings.queue) == 0
    assert not ReceivedResult.objects.exists()
    assert consumer.alive()
    assert consumer.stop() == 0


def test_a_mismatched_result_is_dead_lettered_and_both_jobs_it_named_wait_on(
    start_worker, start_consumer, park_job, broker, run_settings
):
    worker = start_worker()
    # Given three jobs parked by upstream's evaluation manager, and a result for the first that
    # names the second's saved environ, published with the third's result
    named, other, third = (park_job() for _ in range(3))
    sent = {env["job_id"]: sent_group(env["job_id"]) for env in (named, other, third)}
    bad = sioworkersd_result(sent[named["job_id"]])
    bad["saved_environ_id"] = sent[other["job_id"]]["saved_environ_id"]
    publish(bad, run_settings)
    publish(sioworkersd_result(sent[third["job_id"]]), run_settings)
    # When the consumer takes them
    consumer = start_consumer()
    # Then the third job finishes, and the bad result is dead-lettered as a mismatch
    wait_until(job_finished(third["job_id"]), what="the third job to finish")
    broker.wait_depth(run_settings.dead_letter_queue, 1)
    [(props, dead_body)] = broker.drain(run_settings.dead_letter_queue)
    assert json.loads(dead_body) == bad
    assert props.headers["x-oioioi-reason"] == "mismatch"
    assert other["job_id"] in props.headers["x-oioioi-error"]
    # And both jobs it named still wait, each with its own saved environ in upstream's table
    for env in (named, other):
        job = QueuedJob.objects.get(job_id=env["job_id"])
        assert job.state == "WAITING"
        saved_id = sent[env["job_id"]]["saved_environ_id"]
        assert SavedEnviron.objects.filter(pk=saved_id, queued_job=job).exists()
        assert not StepLog.objects.filter(job_id=env["job_id"]).exists()
    assert list(ReceivedResult.objects.values_list("job_id", flat=True)) == [third["job_id"]]
    # And their own results still resume them, once each, in the Celery worker
    for env in (named, other):
        publish(sioworkersd_result(sent[env["job_id"]]), run_settings)
    for env in (named, other):
        wait_until(job_finished(env["job_id"]), what="a job the bad result named to finish")
        assert steps(env["job_id"]) == [("after-results", worker.pid)]
    broker.wait_depth(run_settings.queue, 0)
    assert broker.depth(run_settings.dead_letter_queue) == 0
    assert consumer.stop() == 0


def _park_four(park_job, tmp_path: Path, restore: str) -> tuple[list[dict], list[dict], Path]:
    """Four parked jobs, the third with a restore function that kills the consumer while the
    returned flag exists; their results are published (first to last) but not consumed yet."""
    flag = tmp_path / "crash"
    flag.touch()
    jobs = [park_job(restore=restore, crash_flag=flag) if i == 2 else park_job() for i in range(4)]
    results = [sioworkersd_result(sent_group(env["job_id"])) for env in jobs]
    return jobs, results, flag


def _all_finished_once(jobs: list[dict], worker_pid: int) -> None:
    for env in jobs:
        wait_until(job_finished(env["job_id"]), timeout=60, what=f"job {env['job_id']} to finish")
    for env in jobs:
        # Every recipe ran once, in the Celery worker
        assert steps(env["job_id"]) == [("after-results", worker_pid)]


def _wait_for_released_claims() -> None:
    """Until the runs a dead consumer held for its hand-off are free to take over."""
    wait_until(
        lambda: not PendingRun.objects.filter(claimed_until__gt=timezone.now()).exists(),
        timeout=30,
        what="the dead consumer's hand-off claims to expire",
    )


def test_a_consumer_killed_between_commit_and_ack_applies_each_result_once(
    start_worker, start_consumer, park_job, broker, run_settings, tmp_path
):
    worker = start_worker()
    jobs, results, flag = _park_four(park_job, tmp_path, "results_e2e.recipes.kill_after_commit")
    for result in results:
        publish(result, run_settings)
    crash_key = results[2]["group_id"]

    # When the consumer is SIGKILLed right after the commit of the batch holding the third
    first = start_consumer(ready=False, **SHORT_LEASE)
    assert first.wait_exit() == -9, first.log
    in_commit = set(json.loads(Path(f"{flag}.keys").read_text()))
    committed = set(ReceivedResult.objects.values_list("key", flat=True))
    unacked = set(broker.browse())
    # Then its batch was committed and not acknowledged: every message of it is still queued
    batch = in_commit & unacked
    assert crash_key in batch
    assert len(batch) >= 2, f"the batch held {batch}; expected the third with another"
    assert batch <= committed
    assert not SavedEnviron.objects.filter(
        queued_job__job_id__in=[j["job_id"] for j in jobs]
    ).exists()

    # And a new consumer takes the redeliveries for duplicates and hands the runs the dead one
    # held to Celery once its claims expire: every result applied once, every recipe run once
    flag.unlink()
    _wait_for_released_claims()
    second = start_consumer(**SHORT_LEASE)
    _all_finished_once(jobs, worker.pid)
    for key in batch:
        wait_until(
            lambda key=key: f"Result {key!r} duplicate" in second.log,
            what=f"the redelivery of {key} to be a duplicate",
        )
    assert sorted(ReceivedResult.objects.values_list("outcome", flat=True)) == ["resumed"] * 4
    assert not PendingRun.objects.exists()
    broker.wait_depth(run_settings.queue, 0)
    assert broker.depth(run_settings.dead_letter_queue) == 0
    assert second.stop() == 0


def test_a_consumer_killed_mid_batch_applies_each_result_once(
    start_worker, start_consumer, park_job, broker, run_settings, tmp_path
):
    worker = start_worker()
    jobs, results, flag = _park_four(park_job, tmp_path, "results_e2e.recipes.kill_mid_write")
    for result in results:
        publish(result, run_settings)
    crash_key = results[2]["group_id"]

    # When the consumer is SIGKILLed in the middle of writing the batch holding the third
    first = start_consumer(ready=False, **SHORT_LEASE)
    assert first.wait_exit() == -9, first.log
    in_transaction = set(json.loads(Path(f"{flag}.keys").read_text()))
    committed = set(ReceivedResult.objects.values_list("key", flat=True))
    # Then the whole batch was rolled back: the third and the others it was written with
    rolled_back = in_transaction - committed
    assert crash_key in rolled_back
    assert len(rolled_back) >= 2, f"the batch held {rolled_back}; expected the third with another"
    assert rolled_back <= set(broker.browse())
    assert SavedEnviron.objects.filter(queued_job__job_id=jobs[2]["job_id"]).exists()

    # And a new consumer applies each of them once; every recipe runs once
    flag.unlink()
    _wait_for_released_claims()
    second = start_consumer(**SHORT_LEASE)
    _all_finished_once(jobs, worker.pid)
    for key in rolled_back:
        wait_until(
            lambda key=key: f"Result {key!r} committed" in second.log,
            what=f"{key} to be written by the second consumer",
        )
    assert sorted(ReceivedResult.objects.values_list("outcome", flat=True)) == ["resumed"] * 4
    assert not PendingRun.objects.exists()
    broker.wait_depth(run_settings.queue, 0)
    assert broker.depth(run_settings.dead_letter_queue) == 0
    assert second.stop() == 0


def test_the_consumer_says_at_start_which_write_path_and_recipe_runner_it_uses(start_consumer):
    consumer = start_consumer("--batch-size", "7")
    [line] = [line for line in consumer.log.splitlines() if "Writing results" in line]
    assert re.search(
        r"Writing results in batches of up to 7 results, .* on postgresql; "
        r"recipes relayed to Celery's evalmgr workers through the outbox",
        line,
    ), line
    assert consumer.stop() == 0
