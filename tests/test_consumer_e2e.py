"""End to end through the real command, a real broker and the real ORM (SQLite by default)."""

from __future__ import annotations

import json
import signal

import pika
import pytest

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.models import PendingRun, ReceivedResult
from tests.conftest import result_for
from tests.helpers import job_done, wait_until
from tests.recipeapp.models import StepLog

pytestmark = pytest.mark.django_db(transaction=True)


def test_result_resumes_waiting_job_and_is_acked(broker, start_consumer, waiting_job):
    # Given a job waiting for sioworkers and a running consumer
    sent = waiting_job()
    consumer = start_consumer()
    # When the worker publishes its result
    result = result_for(sent)
    broker.publish_env(result, message_id=result["group_id"])
    # Then the job resumes, its recipe runs to the end, and the queue is empty
    wait_until(job_done(sent["job_id"]), what="job resumed")
    assert not SavedEnviron.objects.exists()
    assert not PendingRun.objects.exists()
    assert StepLog.objects.get(job_id=sent["job_id"]).detail == json.dumps(["job0", "job1"])
    inbox = ReceivedResult.objects.get()
    assert (inbox.key, inbox.outcome, inbox.job_id) == (
        result["group_id"],
        "resumed",
        sent["job_id"],
    )
    assert inbox.submission_id == 1234
    broker.wait_depth(broker.settings.queue, 0)
    assert broker.depth(broker.settings.dead_letter_queue) == 0
    assert consumer.stop() == 0


def test_message_without_properties_is_accepted(broker, start_consumer, waiting_job):
    sent = waiting_job()
    start_consumer()
    broker.publish_raw(json.dumps(result_for(sent)).encode(), None)
    wait_until(job_done(sent["job_id"]), what="job resumed")
    assert ReceivedResult.objects.get().key.startswith("sha256:")


@pytest.mark.parametrize(
    ("body", "reason", "error"),
    [
        (b"\x80garbage", "undecodable", "not UTF-8"),
        (b"{not json", "undecodable", "not JSON"),
        (b"[]", "invalid", "JSON object"),
        (b'{"workers_jobs": {"job0": {}}}', "invalid", "neither"),
        (b'{"workers_jobs.results": {}}', "rejected", "no 'job_id'"),
        (b'{"error": {}, "job_id": "j", "saved_environ_id": "seven"}', "rejected", "integer"),
        (b'{"error": {}, "job_id": "j"}', "no-saved-environ", "no 'saved_environ_id'"),
    ],
)
def test_bad_message_is_dead_lettered_with_reason_and_consumer_goes_on(
    broker, start_consumer, waiting_job, body, reason, error
):
    sent = waiting_job()
    consumer = start_consumer()
    broker.publish_raw(body, pika.BasicProperties(message_id="bad-1", delivery_mode=2))
    broker.wait_depth(broker.settings.dead_letter_queue, 1)
    [(props, dead_body)] = broker.drain(broker.settings.dead_letter_queue)
    assert dead_body == body
    assert props.message_id == "bad-1"
    assert props.headers["x-oioioi-reason"] == reason
    assert error in props.headers["x-oioioi-error"]
    assert props.headers["x-oioioi-error-class"].startswith("consumer.errors.")
    assert props.headers["x-oioioi-host"]
    assert props.headers["x-oioioi-failed-at"]
    assert props.headers["x-oioioi-delivery-count"] == 1
    assert len(props.headers["x-oioioi-dead-letter-id"]) == 32
    assert props.delivery_mode == 2
    broker.wait_depth(broker.settings.queue, 0)
    # The consumer is still running and still applies good results.
    broker.publish_env(result_for(sent))
    wait_until(job_done(sent["job_id"]), what="job resumed after the bad message")
    assert consumer.alive()
    # Only the good result reached the inbox; the bad message left no record.
    assert list(ReceivedResult.objects.values_list("job_id", flat=True)) == [sent["job_id"]]


def test_redelivery_has_no_second_effect(broker, start_consumer, waiting_job):
    sent = waiting_job()
    result = result_for(sent)
    start_consumer()
    broker.publish_env(result, message_id=result["group_id"])
    wait_until(job_done(sent["job_id"]), what="first delivery applied")
    # The same message again (as after a crash between commit and ack), and the same body
    # with no id at all, and sioworkersd's retry of the same group under a new message id.
    broker.publish_env(result, message_id=result["group_id"])
    broker.publish_raw(json.dumps(result).encode(), None)
    broker.publish_env(result, message_id="another-id")
    wait_until(lambda: ReceivedResult.objects.count() == 3, what="all deliveries settled")
    broker.wait_depth(broker.settings.queue, 0)
    assert StepLog.objects.filter(job_id=sent["job_id"]).count() == 1
    outcomes = sorted(ReceivedResult.objects.values_list("outcome", flat=True))
    assert outcomes == ["ignored", "ignored", "resumed"]
    assert broker.depth(broker.settings.dead_letter_queue) == 0


def test_batch_with_one_bad_result_applies_the_others(broker, start_consumer, waiting_job):
    jobs = [waiting_job(submission_id=i) for i in range(6)]
    results = [result_for(sent) for sent in jobs]
    results[3].pop("job_id")  # refused by the domain: must not take the batch down with it
    for r in results:
        broker.publish_env(r, message_id=r["group_id"])
    start_consumer()
    for i, sent in enumerate(jobs):
        if i != 3:
            wait_until(job_done(sent["job_id"]), what=f"job {i} resumed")
    broker.wait_depth(broker.settings.dead_letter_queue, 1)
    [(props, _)] = broker.drain(broker.settings.dead_letter_queue)
    assert props.message_id == results[3]["group_id"]
    assert props.headers["x-oioioi-reason"] == "rejected"


def test_a_mismatched_result_is_dead_lettered_and_both_jobs_it_named_left_waiting(
    broker, start_consumer, waiting_job
):
    # Given six waiting jobs, and in one batch with their results a result for job 0 that names
    # job 1's saved environ
    jobs = [waiting_job(submission_id=i) for i in range(6)]
    named, other = jobs[0], jobs[1]
    bad = result_for(named)
    bad["saved_environ_id"] = other["saved_environ_id"]
    for r in [result_for(s) for s in jobs[2:4]] + [bad] + [result_for(s) for s in jobs[4:]]:
        broker.publish_env(r, message_id=r["group_id"])
    start_consumer()
    # Then the other results are applied, and the bad one is dead-lettered as a mismatch
    for sent in jobs[2:]:
        wait_until(job_done(sent["job_id"]), what=f"job {sent['submission_id']} resumed")
    broker.wait_depth(broker.settings.dead_letter_queue, 1)
    broker.wait_depth(broker.settings.queue, 0)
    [(props, body)] = broker.drain(broker.settings.dead_letter_queue)
    assert json.loads(body) == bad
    assert props.headers["x-oioioi-reason"] == "mismatch"
    assert props.headers["x-oioioi-error-class"] == "consumer.errors.MismatchedEnviron"
    assert other["job_id"] in props.headers["x-oioioi-error"]
    # And both jobs it named still wait, each with its own saved environ, and nothing of the
    # bad result was recorded
    for sent in (named, other):
        job = QueuedJob.objects.get(job_id=sent["job_id"])
        assert job.state == "WAITING"
        assert SavedEnviron.objects.get(id=sent["saved_environ_id"]).queued_job_id == job.job_id
    assert not ReceivedResult.objects.filter(group_id=bad["group_id"]).exists()
    assert not PendingRun.objects.exists()
    # Their own results still resume them
    for sent in (named, other):
        broker.publish_env(result_for(sent))
        wait_until(job_done(sent["job_id"]), what="a job the bad result named resumed")


def test_unexpected_error_is_retried_through_the_broker_then_dead_lettered(
    broker, start_consumer, waiting_job
):
    # A restore function that raises is a bug on our side, not a bad message: it is retried
    # (max_retries=2 in the test settings), then dead-lettered with the traceback.
    sent = waiting_job()
    saved = SavedEnviron.objects.get(queued_job_id=sent["job_id"])
    env = saved.load_environ()
    env["restore_environ_func"] = "tests.recipeapp.recipes.no_such_function"
    saved.environ = json.dumps(env)
    saved.save()
    consumer = start_consumer()
    broker.publish_env(result_for(sent), message_id="buggy")
    broker.wait_depth(broker.settings.dead_letter_queue, 1, timeout=30)
    [(props, _)] = broker.drain(broker.settings.dead_letter_queue)
    assert props.headers["x-oioioi-reason"] == "failed"
    assert props.headers["x-oioioi-retries"] == 2
    assert "Traceback" in props.headers["x-oioioi-traceback"]
    assert "no_such_function" in props.headers["x-oioioi-error"]
    assert consumer.log.count("retrying in") == 2
    # Nothing was applied: the saved environ is still there for a replay once fixed.
    assert SavedEnviron.objects.filter(pk=saved.pk).exists()
    assert not ReceivedResult.objects.exists()


def test_sigterm_finishes_the_message_in_hand_and_exits_cleanly(
    broker, start_consumer, waiting_job
):
    # The recipe step after the resume is slow, so the signal arrives while work is in hand.
    sent = waiting_job(after=[("slow", "tests.recipeapp.recipes.slow", {"seconds": 2})])
    consumer = start_consumer()
    broker.publish_env(result_for(sent), message_id="in-hand")
    consumer.wait_for_log("'in-hand' committed")
    consumer.signal(signal.SIGTERM)
    assert consumer.proc.wait(30) == 0
    assert "Consumer stopped." in consumer.log
    broker.wait_depth(broker.settings.queue, 0)
    assert ReceivedResult.objects.filter(key="in-hand").exists()


def test_second_signal_exits_at_once_and_the_message_comes_back(
    broker, start_consumer, waiting_job, queue_settings
):
    sent = waiting_job()
    saved = SavedEnviron.objects.get(queued_job_id=sent["job_id"])
    env = saved.load_environ()
    # A restore that takes long keeps the message in hand (before the commit).
    env["restore_environ_func"] = "tests.recipeapp.recipes.slow_restore"
    saved.environ = json.dumps(env)
    saved.save()
    consumer = start_consumer()
    broker.publish_env(result_for(sent), message_id="twice")
    consumer.wait_for_log("slow restore started")
    consumer.signal(signal.SIGTERM)
    # Two signals sent back to back may be merged into one by the kernel.
    consumer.wait_for_log("SIGTERM received")
    consumer.signal(signal.SIGTERM)
    assert consumer.proc.wait(10) == 128 + signal.SIGTERM
    # Not acked, so it is back on the queue; a new consumer applies it.
    broker.wait_depth(broker.settings.queue, 1)
    start_consumer()
    wait_until(job_done(sent["job_id"]), what="job resumed by the second consumer")


def test_consumer_survives_a_broker_restart(private_broker, start_consumer, waiting_job):
    from tests.conftest import BrokerClient, make_settings

    settings = make_settings(private_broker.url)
    client = BrokerClient(settings)
    first, second = waiting_job(), waiting_job()
    consumer = start_consumer(settings=settings)
    client.publish_env(result_for(first))
    wait_until(job_done(first["job_id"]), what="first job resumed")
    private_broker.stop_app()
    consumer.wait_for_log("Broker unavailable")
    private_broker.start_app()
    client.publish_env(result_for(second))
    wait_until(job_done(second["job_id"]), timeout=60, what="second job after the restart")
    assert consumer.alive()
