"""The dead-letter archiver and replay against the real broker and the real ORM: a batch is committed,
then acked; a database that refuses the batch leaves every message in the queue; a copy that
comes back after a crash between commit and ack (or after its row was replayed) is not listed
twice; a replay publishes with confirms and settles only what the broker confirmed.

Run on SQLite and in the PostgreSQL pass (the replay's row locks are PostgreSQL's).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pika
import pytest
from django.db import DatabaseError, connection

from consumer import topology
from consumer.config import Settings
from oioioi.workers import deadletters
from oioioi.workers.models import DeadLetter
from results_dead_letters import archiving as queue
from results_dead_letters.letters import DeadLetter as QueuedLetter
from tests.conftest import BrokerClient

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.both_databases]


@pytest.fixture
def dlq(queue_settings: Settings) -> Settings:
    conn = pika.BlockingConnection(pika.URLParameters(queue_settings.amqp_url))
    topology.declare(conn.channel(), queue_settings)
    conn.close()
    return queue_settings


def put(settings: Settings, letter_id: str, reason: str = "failed", **body: Any) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        "",
        settings.dead_letter_queue,
        json.dumps({"job_id": f"job-{letter_id}", "group_id": f"G-{letter_id}", **body}).encode(),
        pika.BasicProperties(
            message_id=f"G-{letter_id}",
            delivery_mode=2,
            content_type="application/json",
            headers={
                "x-oioioi-dead-letter-id": letter_id,
                "x-oioioi-reason": reason,
                "x-oioioi-replays": 1 if letter_id.endswith("r") else 0,
                "custom": "kept",
            },
        ),
        mandatory=True,
    )
    conn.close()


def waiting() -> list[str]:
    return list(DeadLetter.objects.unsettled().order_by("pk").values_list("letter_id", flat=True))


def test_archive_moves_each_dead_letter_once(dlq):
    # Given four dead letters in the broker's queue
    for letter_id in ("a", "b", "c", "dr"):
        put(dlq, letter_id, submission_id=7)
    broker = BrokerClient(dlq)

    # When the archiver runs, in batches smaller than the queue
    moved = queue.archive(dlq, deadletters.store, batch=3)

    # Then each is a row, with what the pages show, and the queue is empty
    assert moved == 4
    assert waiting() == ["a", "b", "c", "dr"]
    assert broker.depth(dlq.dead_letter_queue) == 0
    row = DeadLetter.objects.get(letter_id="dr")
    assert (row.reason, row.job_id, row.group_id, row.message_id) == (
        "failed",
        "job-dr",
        "G-dr",
        "G-dr",
    )
    assert row.submission_id == 7 and row.replays == 1
    assert json.loads(row.properties)["headers"]["custom"] == "kept"

    # A second copy of one (a crash between commit and ack) is acked and not listed twice
    put(dlq, "b")
    assert queue.archive(dlq, deadletters.store) == 1
    assert waiting() == ["a", "b", "c", "dr"]
    assert broker.depth(dlq.dead_letter_queue) == 0

    # ... nor once its row was replayed: the settled row remembers it
    report = deadletters.replay_all(dlq, DeadLetter.objects.filter(letter_id="b"))
    assert report.replayed == 1 and report.error is None
    put(dlq, "b")
    queue.archive(dlq, deadletters.store)
    assert waiting() == ["a", "c", "dr"]
    [(props, body)] = broker.drain(dlq.queue)
    assert props.message_id == "G-b" and props.headers["x-oioioi-replays"] == 1
    assert props.headers["custom"] == "kept" and "x-oioioi-reason" not in props.headers
    assert json.loads(body)["job_id"] == "job-b"


def test_a_limited_step_moves_no_more_than_its_limit(dlq):
    for i in range(7):
        put(dlq, f"m{i}")
    assert queue.archive(dlq, deadletters.store, limit=5, batch=2) == 5
    # What the step took beyond its limit (to settle its last ack) went back to the queue
    BrokerClient(dlq).wait_depth(dlq.dead_letter_queue, 2)
    assert queue.archive(dlq, deadletters.store) == 2
    assert waiting() == [f"m{i}" for i in range(7)]


def test_nothing_is_acked_when_the_database_refuses_the_batch(dlq):
    # Given three dead letters, and a database that has lost the table (a real error of the ORM)
    for letter_id in ("x", "y", "z"):
        put(dlq, letter_id)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE workers_deadletter RENAME TO workers_deadletter_away")
    try:
        # When the archiver runs, the write fails, and nothing is acknowledged
        with pytest.raises(DatabaseError):
            queue.archive(dlq, deadletters.store)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE workers_deadletter_away RENAME TO workers_deadletter")
    BrokerClient(dlq).wait_depth(dlq.dead_letter_queue, 3)

    # Then once the database is back, each is moved, once
    assert queue.archive(dlq, deadletters.store) == 3
    assert waiting() == ["x", "y", "z"]


class Died(BaseException):
    """The archiver's process dying right after its commit, before its ack."""


def test_a_crash_between_commit_and_ack_lists_each_once(dlq):
    for letter_id in ("p", "q"):
        put(dlq, letter_id)

    def commit_then_die(letters: list[QueuedLetter]) -> None:
        deadletters.store(letters)
        raise Died

    with pytest.raises(Died):
        queue.archive(dlq, commit_then_die)
    # Committed, never acked: the broker has them again, and the table has them once
    BrokerClient(dlq).wait_depth(dlq.dead_letter_queue, 2)
    assert waiting() == ["p", "q"]
    assert queue.archive(dlq, deadletters.store) == 2
    assert waiting() == ["p", "q"]
    assert BrokerClient(dlq).depth(dlq.dead_letter_queue) == 0


def test_replay_settles_only_what_the_broker_confirmed(dlq):
    for letter_id in ("k1", "k2"):
        put(dlq, letter_id)
    queue.archive(dlq, deadletters.store)
    # A results queue cut off from the exchange: the broker returns the copies
    conn = pika.BlockingConnection(pika.URLParameters(dlq.amqp_url))
    conn.channel().queue_unbind(dlq.queue, dlq.exchange, dlq.routing_key)
    conn.close()
    report = deadletters.replay_all(dlq, DeadLetter.objects.all())
    assert (report.replayed, report.failed) == (0, 2)
    assert waiting() == ["k1", "k2"]
    # The broker gone: the chunk stops with the error, and nothing is settled
    broken = dataclasses.replace(dlq, amqp_url="amqp://guest:guest@127.0.0.1:1/%2F")
    report = deadletters.replay_chunk(broken, DeadLetter.objects.all())
    assert report.error is not None and report.replayed == 0
    assert waiting() == ["k1", "k2"]
    # Bound again: both go, each once
    conn = pika.BlockingConnection(pika.URLParameters(dlq.amqp_url))
    conn.channel().queue_bind(dlq.queue, dlq.exchange, dlq.routing_key)
    conn.close()
    report = deadletters.replay_all(dlq, DeadLetter.objects.all())
    assert (report.replayed, report.failed) == (2, 0)
    assert waiting() == []
    assert sorted(p.message_id for p, _ in BrokerClient(dlq).drain(dlq.queue)) == ["G-k1", "G-k2"]
