"""Faults, one at a time, through the real command, a real broker and a real database.

Each test breaks one thing the failure policy (consumer/policy.py) has an answer for and checks
the answer: nothing lost, nothing applied twice, nothing dead-lettered that did not deserve it.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pika
import pytest

from consumer.errors import StaleDelivery
from consumer.transport import Transport
from oioioi.evalmgr.models import SavedEnviron
from oioioi.workers.models import DeliveryAttempt, PendingRun, ReceivedResult
from tests.conftest import BrokerClient, make_settings, result_for
from tests.faults import PgFaults, consumer_database_url, queue_counts
from tests.helpers import job_done, wait_until
from tests.recipeapp.models import StepLog

pytestmark = pytest.mark.django_db(transaction=True)


def steps(job_id: str) -> list[str]:
    return sorted(StepLog.objects.filter(job_id=job_id).values_list("step", flat=True))


def set_restore(sent: dict[str, Any], func: str, **extra: Any) -> None:
    """Give a waiting job another restore function (and fields it reads)."""
    saved = SavedEnviron.objects.get(pk=sent["saved_environ_id"])
    env = saved.load_environ()
    env["restore_environ_func"] = func
    env.update(extra)
    saved.environ = json.dumps(env)
    saved.save()


def assert_queues_settled(client: BrokerClient, dead: int = 0) -> None:
    s = client.settings
    client.wait_depth(s.queue, 0)
    assert client.depth(s.retry_queue) == 0
    assert client.depth(s.dead_letter_queue) == dead


# --- the database -----------------------------------------------------------------------------


def test_locked_sqlite_database_is_waited_out_in_process(broker, start_consumer, waiting_job):
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.fail("this test holds SQLite's write lock; run it in the SQLite pass")
    sent = waiting_job()
    # Each attempt gives up on the lock after 0.2 s: the retries, not SQLite's own wait, carry it.
    consumer = start_consumer(
        SQLITE_BUSY_TIMEOUT="0.2", RESULTS_DB_RETRY_ATTEMPTS="40", RESULTS_DB_RETRY_MAX="0.2"
    )
    # Given another process holding the database's write lock for 2 s
    locker = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        broker.publish_env(result_for(sent), message_id="locked")
        consumer.wait_for_log("database is locked")
        time.sleep(2)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # Then the write was retried in-process and went through once, with nothing dead-lettered
    wait_until(job_done(sent["job_id"]), what="the job to resume")
    assert steps(sent["job_id"]) == ["after-results"]
    assert "Retrying" in consumer.log
    assert "Database unavailable" not in consumer.log
    assert_queues_settled(broker)
    assert consumer.stop() == 0


def test_error_that_looks_transient_but_follows_the_message_is_not_an_outage(
    broker, start_consumer, waiting_job
):
    # A restore that always raises OperationalError (as a statement timeout the message causes
    # would): the database answers every probe, so after three rounds it is the message's fault.
    sent = waiting_job()
    set_restore(sent, "tests.recipeapp.recipes.operational_error_restore")
    other = waiting_job()
    consumer = start_consumer(RESULTS_DB_RETRY_ATTEMPTS="2")
    broker.publish_env(result_for(sent), message_id="looks-transient")
    broker.publish_env(result_for(other), message_id="innocent")
    broker.wait_depth(broker.settings.dead_letter_queue, 1, timeout=60)
    [(props, _)] = broker.drain(broker.settings.dead_letter_queue)
    assert props.message_id == "looks-transient"
    assert props.headers["x-oioioi-reason"] == "failed"
    assert props.headers["x-oioioi-error-class"] == "consumer.errors.WriteKeepsFailing"
    assert props.headers["x-oioioi-retries"] == 2
    wait_until(job_done(other["job_id"]), what="the other job")
    assert consumer.alive()


def test_deeply_nested_json_is_dead_lettered_not_a_crash(broker, start_consumer, waiting_job):
    sent = waiting_job()
    consumer = start_consumer()
    broker.publish_raw(b"[" * 200_000, pika.BasicProperties(message_id="deep", delivery_mode=2))
    broker.wait_depth(broker.settings.dead_letter_queue, 1)
    [(props, _)] = broker.drain(broker.settings.dead_letter_queue)
    assert props.headers["x-oioioi-reason"] == "undecodable"
    assert "RecursionError" in props.headers["x-oioioi-error"]
    broker.publish_env(result_for(sent))
    wait_until(job_done(sent["job_id"]), what="a result after the deep one")
    assert consumer.alive()


@pytest.mark.postgres
def test_sustained_database_outage_holds_messages_and_resumes_by_itself(
    private_broker, start_consumer, waiting_job
):
    settings = make_settings(private_broker.url)
    client = BrokerClient(settings)
    jobs = [waiting_job(submission_id=i) for i in range(8)]
    # An in-process budget of about a second, so that a 15 s outage is well past it.
    consumer = start_consumer(
        settings=settings,
        DATABASE_URL=consumer_database_url(),
        RESULTS_DB_RETRY_ATTEMPTS="3",
        RESULTS_DB_RETRY_MAX="0.3",
        RESULTS_DB_PROBE_MAX="1",
    )
    pg = PgFaults()
    try:
        # Given the database gone
        pg.outage()
        started = time.monotonic()
        # When results arrive meanwhile
        for sent in jobs:
            result = result_for(sent)
            client.publish_env(result, message_id=result["group_id"])
        consumer.wait_for_log("Database unavailable")
        consumer.wait_for_log("Database still unavailable")

        # Then they are held, unacknowledged, and nothing is dead-lettered or sent for a retry
        # (the broker refreshes these counts every few seconds)
        def held() -> bool:
            ready, unacked = queue_counts(private_broker, settings.queue)
            return unacked >= 1 and ready + unacked == len(jobs)

        wait_until(held, timeout=15, what="the results held unacknowledged")
        assert client.depth(settings.dead_letter_queue) == 0
        assert client.depth(settings.retry_queue) == 0
        time.sleep(max(0.0, 15 - (time.monotonic() - started)))
        assert sum(queue_counts(private_broker, settings.queue)) == len(jobs)
    finally:
        pg.close()
    # And once the database is back, everything is applied once, by the same process
    for sent in jobs:
        wait_until(job_done(sent["job_id"]), timeout=60, what="the jobs after the outage")
        assert steps(sent["job_id"]) == ["after-results"]
    assert consumer.alive()
    consumer.wait_for_log("Database is back")
    assert ReceivedResult.objects.filter(outcome="resumed").count() == len(jobs)
    # No retry was spent on the outage: nothing went through the retry queue.
    assert "retrying in" not in consumer.log
    assert_queues_settled(client)
    wait_until(
        lambda: queue_counts(private_broker, settings.queue) == (0, 0),
        timeout=15,
        what="nothing left unacknowledged",
    )
    assert consumer.stop() == 0


@pytest.mark.postgres
def test_connections_terminated_mid_stream_lose_and_repeat_nothing(
    broker, start_consumer, waiting_job
):
    jobs = [waiting_job(submission_id=i) for i in range(40)]
    for sent in jobs:
        result = result_for(sent)
        broker.publish_env(result, message_id=result["group_id"])
    pg = PgFaults()
    stop = threading.Event()
    cuts = []

    def cut() -> None:
        while not stop.is_set():
            cuts.append(pg.terminate())
            time.sleep(0.15)

    cutter = threading.Thread(target=cut)
    try:
        consumer = start_consumer("--batch-size", "4", DATABASE_URL=consumer_database_url())
        cutter.start()
        wait_until(
            lambda: ReceivedResult.objects.count() >= len(jobs) // 2, what="half the results"
        )
    finally:
        stop.set()
        if cutter.is_alive():
            cutter.join()
        pg.close()
    assert sum(cuts) > 0, "no consumer connection was terminated"
    for sent in jobs:
        wait_until(job_done(sent["job_id"]), timeout=60, what="every job")
        assert steps(sent["job_id"]) == ["after-results"]
    assert ReceivedResult.objects.filter(outcome="resumed").count() == len(jobs)
    assert_queues_settled(broker)
    assert "retrying in" not in consumer.log
    assert consumer.stop() == 0


# --- the broker -------------------------------------------------------------------------------


def test_heartbeats_flow_during_a_write_longer_than_two_intervals(
    broker, start_consumer, waiting_job
):
    sent = waiting_job()
    set_restore(sent, "tests.recipeapp.recipes.slow_restore")  # 3 s, inside the transaction
    consumer = start_consumer(AMQP_HEARTBEAT="1")
    broker.publish_env(result_for(sent), message_id="slow")
    consumer.wait_for_log("slow restore started")
    wait_until(job_done(sent["job_id"]), what="the slow job")
    time.sleep(2.5)  # and some idle heartbeat intervals after it
    assert "Broker unavailable" not in consumer.log
    assert "missed heartbeats" not in consumer.log
    assert consumer.log.count("'slow' committed") == 1
    assert "duplicate" not in consumer.log
    assert_queues_settled(broker)
    assert consumer.stop() == 0


def test_broker_closing_the_connection_mid_write_costs_nothing(
    private_broker, start_consumer, waiting_job
):
    settings = make_settings(private_broker.url)
    client = BrokerClient(settings)
    sent, later = waiting_job(), waiting_job()
    set_restore(sent, "tests.recipeapp.recipes.slow_restore")
    consumer = start_consumer(settings=settings)
    client.publish_env(result_for(sent), message_id="in-hand")
    consumer.wait_for_log("slow restore started")
    # When the broker closes the connection while the write runs
    private_broker.close_all_connections()
    consumer.wait_for_log("Broker unavailable")
    # Then the write still commits, the redelivery is recognised, and no old tag is acked
    wait_until(job_done(sent["job_id"]), what="the job in hand")
    wait_until(lambda: "'in-hand' duplicate" in consumer.log, what="the redelivery")
    assert ReceivedResult.objects.get(key="in-hand").outcome == "resumed"
    assert steps(sent["job_id"]) == ["after-results"]
    client.publish_env(result_for(later))
    wait_until(job_done(later["job_id"]), what="a result after the reconnect")
    assert "PRECONDITION_FAILED" not in consumer.log
    assert "unknown delivery tag" not in consumer.log
    assert_queues_settled(client)
    assert consumer.stop() == 0


def test_write_failing_while_the_broker_is_gone_spends_no_retry(
    private_broker, start_consumer, waiting_job
):
    settings = make_settings(private_broker.url)
    client = BrokerClient(settings)
    sent = waiting_job()
    set_restore(sent, "tests.recipeapp.recipes.slow_failing_restore")
    consumer = start_consumer(settings=settings)
    client.publish_env(result_for(sent), message_id="failing")
    consumer.wait_for_log("slow restore started")
    # When the connection goes while the write runs, and then the write fails
    private_broker.close_all_connections()
    consumer.wait_for_log("Broker unavailable")
    # Then that failure is not counted: the message still gets its two retries
    client.wait_depth(settings.dead_letter_queue, 1, timeout=60)
    [(props, _)] = client.drain(settings.dead_letter_queue)
    assert props.headers["x-oioioi-retries"] == 2
    assert consumer.log.count("slow restore started") == 4
    assert consumer.log.count("retrying in") == 2
    assert_queues_settled(client)
    assert SavedEnviron.objects.filter(pk=sent["saved_environ_id"]).exists()


@pytest.mark.parametrize("copy_to", ["dead_letter_queue", "retry_queue"])
def test_a_copy_the_broker_does_not_take_leaves_the_original_unacked(
    broker, start_consumer, waiting_job, copy_to
):
    sent = waiting_job()
    if copy_to == "dead_letter_queue":
        body = b"{not json"
    else:
        set_restore(sent, "tests.recipeapp.recipes.no_such_function")
        body = json.dumps(result_for(sent)).encode()
    consumer = start_consumer()
    # Given the queue the copy must go to deleted under the consumer (the copy is unroutable)
    queue = getattr(broker.settings, copy_to)
    conn = pika.BlockingConnection(pika.URLParameters(broker.settings.amqp_url))
    channel = conn.channel()
    channel.queue_delete(queue)
    # (published on a plain channel: the test client would declare the queue again)
    channel.basic_publish(
        broker.settings.exchange,
        broker.settings.routing_key,
        body,
        pika.BasicProperties(message_id="copied", delivery_mode=2),
    )
    conn.close()
    # Then the original is not acked: the consumer reconnects, declares the queue again, and
    # the message comes back and is settled
    consumer.wait_for_log(f"could not publish to {queue!r}")
    if copy_to == "dead_letter_queue":
        broker.wait_depth(queue, 1)
        [(props, _)] = broker.drain(queue)
        assert props.message_id == "copied"
        assert props.headers["x-oioioi-reason"] == "undecodable"
    else:
        broker.wait_depth(broker.settings.dead_letter_queue, 1, timeout=60)
        [(props, _)] = broker.drain(broker.settings.dead_letter_queue)
        assert props.message_id == "copied"
        assert props.headers["x-oioioi-retries"] == 2
    broker.wait_depth(broker.settings.queue, 0)
    assert consumer.alive()


def test_a_tag_from_a_closed_channel_is_refused_on_its_successor(broker, queue_settings):
    broker.publish_env({"job_id": "j", "error": "x"}, message_id="m")
    first = Transport(queue_settings)
    deadline = time.monotonic() + 10
    delivered = []
    while not delivered and time.monotonic() < deadline:
        delivered = first.receive(1, 0.5)
    assert delivered, "nothing delivered"
    first.close()
    with Transport(queue_settings) as second:
        with pytest.raises(StaleDelivery):
            second.ack(delivered[0])
        again = []
        while not again and time.monotonic() < deadline + 10:
            again = second.receive(1, 0.5)
        assert again[0].redelivered and again[0].body == delivered[0].body
        second.ack(again[0])
    broker.wait_depth(queue_settings.queue, 0)


def test_broker_cancelling_the_consumer_is_a_reconnect(broker, start_consumer, waiting_job):
    sent = waiting_job()
    consumer = start_consumer()
    # The queue deleted under the consumer (an operator, or a quorum queue losing its leader):
    # the broker cancels the consumer, which reconnects and declares the queue again.
    conn = pika.BlockingConnection(pika.URLParameters(broker.settings.amqp_url))
    conn.channel().queue_delete(broker.settings.queue)
    conn.close()
    consumer.wait_for_log("cancelled the consumer")
    wait_until(lambda: consumer.log.count("Consuming from") >= 2, what="the reconnect")
    broker.publish_env(result_for(sent))
    wait_until(job_done(sent["job_id"]), what="a result after the cancel")
    assert consumer.alive()


# --- crashes ------------------------------------------------------------------------------------


def supervise(start, client: BrokerClient, until, timeout: float = 120.0) -> int:
    """Run consumers one after another, restarting each that dies, until ``until()``; returns
    how many died."""
    deaths = 0
    deadline = time.monotonic() + timeout
    consumer = start(ready=False)
    while not until():
        assert time.monotonic() < deadline, f"not settled after {deaths} crashes:\n{consumer.log}"
        if not consumer.alive():
            assert consumer.proc.returncode == 137, consumer.log
            deaths += 1
            consumer = start(ready=False)
        time.sleep(0.1)
    # The last crash may have settled it (the broker dead-letters as the consumer dies).
    if consumer.alive():
        consumer.wait_for_log("Consuming from")  # a SIGTERM before that is not ours to handle
        assert consumer.stop() == 0
    else:
        assert consumer.proc.returncode == 137, consumer.log
        deaths += 1
    return deaths


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_poison_message_that_kills_the_consumer_ends_in_the_dead_letters(
    amqp_url, start_consumer, waiting_job, tmp_path, queue_type
):
    settings = make_settings(amqp_url, queue_type=queue_type, delivery_limit=2)
    client = BrokerClient(settings)
    jobs = [waiting_job(submission_id=i) for i in range(6)]
    poison = jobs[2]
    flag = tmp_path / "crash"
    flag.touch()
    set_restore(poison, "tests.recipeapp.recipes.crash_restore", crash_flag=str(flag))
    for sent in jobs:
        client.publish_env(result_for(sent), message_id=f"m{sent['submission_id']}")
    innocents = [sent for sent in jobs if sent is not poison]
    deaths = supervise(
        lambda **kw: start_consumer(settings=settings, **kw),
        client,
        lambda: (
            client.depth(settings.dead_letter_queue) == 1
            and all(job_done(sent["job_id"])() for sent in innocents)
        ),
    )
    # Killed on its first delivery and on each of the two it was allowed after that
    assert deaths == 3
    [(props, _)] = client.drain(settings.dead_letter_queue)
    assert props.message_id == "m2"
    if queue_type == "quorum":
        # dead-lettered by the broker's delivery limit
        [death] = props.headers["x-death"]
        assert death["reason"] == "delivery_limit"
        assert death["queue"] == settings.queue
    else:
        # dead-lettered by the consumer's own count
        assert props.headers["x-oioioi-reason"] == "delivery-limit"
        assert "limit 2" in props.headers["x-oioioi-error"]
        assert not DeliveryAttempt.objects.exists()
    for sent in innocents:
        assert steps(sent["job_id"]) == ["after-results"]
    # The poison was never applied: its job still waits, to be replayed once the bug is fixed.
    assert SavedEnviron.objects.filter(pk=poison["saved_environ_id"]).exists()
    assert not ReceivedResult.objects.filter(key="m2").exists()
    client.wait_depth(settings.queue, 0)


@pytest.mark.parametrize(
    "after",
    [
        pytest.param([], id="before-the-first-phase"),
        pytest.param(
            [("before", "tests.recipeapp.recipes.record", {"step": "before"})],
            id="between-phases",
        ),
    ],
)
def test_killed_after_the_resume_committed_the_job_still_runs_once(
    broker, start_consumer, waiting_job, tmp_path: Path, after
):
    flag = tmp_path / "crash"
    flag.touch()
    crash = ("crash", "tests.recipeapp.recipes.crash_if_flagged", {"flag": str(flag)})
    sent = waiting_job(after=[*after, crash])
    lease = {"EVALMGR_RUN_LEASE_SECONDS": "2"}
    # Given a consumer killed in the recipe, after the resume committed and the message was acked
    first = start_consumer(**lease)
    broker.publish_env(result_for(sent), message_id="resumed")
    first.proc.wait(30)
    assert first.proc.returncode == 137
    broker.wait_depth(broker.settings.queue, 0)
    run = PendingRun.objects.get(job_id=sent["job_id"])
    assert run.attempts == 1 and run.claimed_by
    assert not SavedEnviron.objects.filter(pk=sent["saved_environ_id"]).exists()
    flag.unlink()
    time.sleep(2.5)  # the dead runner's lease runs out
    # When another consumer starts, with no message for it
    second = start_consumer(**lease)
    # Then it finds the run at once and finishes it, every committed phase exactly once
    wait_until(job_done(sent["job_id"]), timeout=10, what="the stranded job")
    assert "Picked up 1 abandoned run(s)" in second.log
    expected = ["after-results", "before"] if after else ["after-results"]
    assert steps(sent["job_id"]) == expected
    assert ReceivedResult.objects.get(key="resumed").outcome == "resumed"
    assert second.stop() == 0


def test_sigkill_mid_write_the_message_comes_back_and_is_applied_once(
    broker, start_consumer, waiting_job
):
    sent = waiting_job()
    set_restore(sent, "tests.recipeapp.recipes.slow_restore")
    first = start_consumer()
    broker.publish_env(result_for(sent), message_id="killed")
    first.wait_for_log("slow restore started")
    first.signal(signal.SIGKILL)
    first.proc.wait(10)
    second = start_consumer()
    wait_until(job_done(sent["job_id"]), timeout=30, what="the job after the kill")
    assert steps(sent["job_id"]) == ["after-results"]
    assert "'killed' committed" in second.log
    assert_queues_settled(broker)


def test_killed_between_commit_and_ack_the_redelivery_is_a_duplicate_and_the_job_runs(
    broker, start_consumer, waiting_job, tmp_path: Path
):
    flag = tmp_path / "crash"
    flag.touch()
    sent = waiting_job()
    set_restore(sent, "tests.recipeapp.recipes.crash_after_commit_restore", crash_flag=str(flag))
    first = start_consumer()
    broker.publish_env(result_for(sent), message_id="committed-then-killed")
    assert first.proc.wait(30) == 137
    # The write committed (with its pending run, claimed by the dead consumer for the hand-off
    # lease); the ack never happened.
    assert ReceivedResult.objects.filter(key="committed-then-killed").exists()
    assert PendingRun.objects.filter(job_id=sent["job_id"], attempts=1).exists()
    flag.unlink()
    second = start_consumer()
    wait_until(job_done(sent["job_id"]), timeout=30, what="the job after the kill")
    wait_until(
        lambda: "'committed-then-killed' duplicate" in second.log, what="the redelivery settled"
    )
    assert steps(sent["job_id"]) == ["after-results"]
    assert_queues_settled(broker)
    assert second.stop() == 0
