"""Unit tests of the consume loop's decisions, with a recording fake transport (no broker).

These pin the ordering guarantees: nothing is acked before its outcome is durable, a failing batch
falls back to single writes, and the database being away holds messages instead of settling them.
Broker behaviour itself is tested against a real RabbitMQ in test_consumer_e2e.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pytest

from consumer.config import Settings
from consumer.decode import Result
from consumer.errors import ConnectionClosed, RejectedEnviron
from consumer.loop import ResultsConsumer, Store
from consumer.transport import Delivery, Properties


class Transient(Exception):
    pass


class FakeTransport:
    """Hands out scripted batches and records every settle/publish, in order, in ``events``."""

    def __init__(self, batches: list[list[Delivery]], events: list[Any], consumer: ResultsConsumer):
        self.batches = batches
        self.events = events
        self.consumer = consumer
        self.generation = 1
        self.node_url = "amqp://fake:***@node:5672/%2F"

    def __enter__(self) -> FakeTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.events.append(("close",))

    def receive(
        self, max_count: int, timeout: float, max_bytes: int | None = None
    ) -> list[Delivery]:
        if not self.batches:
            self.consumer.stop()
            return []
        return self.batches.pop(0)

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        self.events.append(("ack", delivery.tag, multiple))

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: Properties) -> None:
        self.events.append(("publish", routing_key, properties.headers.get("x-oioioi-reason")))

    def sleep(self, seconds: float) -> None:
        self.events.append(("sleep",))

    def wait(self, future: Future[Any]) -> Any:
        return future.result()


def delivery(tag: int, env: Any, message_id: str | None = None, **headers: Any) -> Delivery:
    body = env if isinstance(env, bytes) else json.dumps(env).encode()
    return Delivery(tag, body, Properties(message_id=message_id, headers=headers), False, 1)


def good(tag: int) -> Delivery:
    return delivery(tag, {"job_id": f"j{tag}", "workers_jobs.results": {}}, f"m{tag}")


def run(batches: list[list[Delivery]], write, probe=lambda: None, **settings: Any) -> list[Any]:
    events: list[Any] = []
    store = Store(
        write=lambda results: (events.append(("write", [r.key for r in results])), write(results))[
            1
        ],
        probe=probe,
        reset=lambda: events.append(("reset",)),
        after_ack=lambda: events.append(("after_ack",)),
        sweep=lambda: None,
        transient=(Transient,),
    )
    config = Settings(
        max_retries=2,
        db_retry_attempts=2,
        db_retry_initial=0.001,
        db_retry_max=0.001,
        db_probe_max=0.001,
        **settings,
    )
    consumer = ResultsConsumer(config, store)
    consumer._transport_factory = lambda s: FakeTransport(batches, events, consumer)  # type: ignore[assignment,return-value]
    consumer.run()
    return events


def test_batch_is_written_once_then_acked_together_then_run():
    events = run([[good(1), good(2), good(3)]], lambda rs: ["committed"] * len(rs))
    assert events[:3] == [("write", ["m1", "m2", "m3"]), ("ack", 3, True), ("after_ack",)]


def test_bad_message_is_dead_lettered_before_the_ack_and_not_written():
    events = run([[good(1), delivery(2, b"nope"), good(3)]], lambda rs: ["committed"] * len(rs))
    assert events[:3] == [
        ("publish", Settings().dead_letter_queue, "undecodable"),
        ("write", ["m1", "m3"]),
        ("ack", 3, True),
    ]


def test_failed_batch_falls_back_to_single_writes():
    def write(results: Sequence[Result]) -> list[str]:
        if any(r.key == "m2" for r in results):
            raise RejectedEnviron("no job")
        return ["committed"] * len(results)

    events = run([[good(1), good(2), good(3)]], write)
    writes = [e for e in events if e[0] == "write"]
    assert writes == [
        ("write", ["m1", "m2", "m3"]),
        ("write", ["m1"]),
        ("write", ["m2"]),
        ("write", ["m3"]),
    ]
    publish = events.index(("publish", Settings().dead_letter_queue, "rejected"))
    assert publish < events.index(("ack", 3, True))


def test_unexpected_error_goes_to_the_retry_queue_then_to_dead_letters():
    def write(results: Sequence[Result]) -> list[str]:
        raise ValueError("bug")

    events = run([[good(1)]], write)
    assert ("publish", Settings().retry_queue, None) in events
    events = run(
        [[delivery(1, {"job_id": "j", "error": {}}, "m", **{"x-oioioi-retries": 2})]], write
    )
    assert ("publish", Settings().dead_letter_queue, "failed") in events


def test_transient_errors_are_retried_in_process_with_a_reset_between():
    calls = []

    def write(results: Sequence[Result]) -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise Transient("busy")
        return ["committed"]

    events = run([[good(1)]], write)
    assert [e[0] for e in events[:4]] == ["write", "reset", "write", "ack"]


def test_database_away_holds_the_message_until_it_answers():
    down = threading.Event()
    down.set()
    probes = []

    def write(results: Sequence[Result]) -> list[str]:
        if down.is_set():
            raise Transient("connection refused")
        return ["committed"]

    def probe() -> None:
        probes.append(1)
        if len(probes) < 3:
            raise Transient("still down")
        down.clear()

    events = run([[good(1)]], write, probe=probe)
    kinds = [e[0] for e in events]
    # No settle of any kind while the database was away; then one write and the ack.
    first_ack = kinds.index("ack")
    assert "publish" not in kinds
    assert kinds[first_ack - 1] == "write" and len(probes) == 3
    assert kinds.count("ack") == 1


def test_connection_loss_during_the_write_acks_nothing_and_reconnects():
    events: list[Any] = []
    attempts = []

    class Losing(FakeTransport):
        def wait(self, future: Future[Any]) -> Any:
            future.result()
            if not attempts:
                attempts.append(1)
                raise ConnectionClosed("gone")
            return future.result()

    store = Store(
        write=lambda rs: ["committed"] * len(rs),
        probe=lambda: None,
        reset=lambda: None,
        after_ack=lambda: None,
        sweep=lambda: None,
        transient=(Transient,),
    )
    consumer = ResultsConsumer(Settings(reconnect_max=0.01), store)
    batches = [[good(1)], [good(1)]]
    consumer._transport_factory = lambda s: Losing(batches, events, consumer)  # type: ignore[assignment,return-value]
    consumer.run()
    assert events.count(("ack", 1, True)) == 1
    assert events[0] == ("close",)  # the first channel closed with nothing acked


@pytest.mark.parametrize("stale", [True])
def test_a_delivery_from_an_earlier_channel_is_never_acked(stale):
    from consumer.errors import StaleDelivery
    from consumer.transport import Transport

    transport = object.__new__(Transport)
    transport.generation = 2
    with pytest.raises(StaleDelivery):
        transport.ack(Delivery(5, b"", Properties(), False, 1))


def test_abandoned_runs_are_swept_under_steady_load_not_after_every_batch():
    # Every receive returns work (the consumer is never idle); with a sweep due at every turn
    # (idle_tick=0) it still happens, and after_ack alone never looks for abandoned runs.
    events: list[Any] = []
    store = Store(
        write=lambda rs: ["committed"] * len(rs),
        probe=lambda: None,
        reset=lambda: None,
        after_ack=lambda: events.append(("after_ack",)),
        sweep=lambda: events.append(("sweep",)),
        transient=(Transient,),
    )
    consumer = ResultsConsumer(Settings(idle_tick=0.0), store)
    batches = [[good(1)], [good(2)], [good(3)]]
    consumer._transport_factory = lambda s: FakeTransport(batches, events, consumer)  # type: ignore[assignment,return-value]
    consumer.run()
    kinds = [e[0] for e in events]
    # One sweep at start, then one after each batch's ack and run.
    assert kinds[:4] == ["sweep", "ack", "after_ack", "sweep"]
    assert kinds.count("ack") == 3 and kinds.count("sweep") >= 4


def test_a_read_only_server_is_recognised_from_either_postgresql_driver():
    """psycopg 3 names the SQLSTATE ``sqlstate``, psycopg2 (upstream's driver) ``pgcode``."""
    from django.db import InternalError

    from oioioi.workers.errors import ReadOnlyDatabase, read_only_is_transient, sqlstate

    class Psycopg3Error(Exception):
        sqlstate = "25006"

    class Psycopg2Error(Exception):
        pgcode = "25006"

    class OtherError(Exception):
        pgcode = "23505"

    def failing(cause: Exception):
        def write() -> None:
            raise InternalError("cannot execute INSERT in a read-only transaction") from cause

        return read_only_is_transient(write)

    for cause in (Psycopg3Error(), Psycopg2Error()):
        with pytest.raises(ReadOnlyDatabase):
            failing(cause)()
    with pytest.raises(InternalError) as raised:
        failing(OtherError())()
    assert not isinstance(raised.value, ReadOnlyDatabase)
    assert sqlstate(InternalError("no cause")) is None
