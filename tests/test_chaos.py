"""The chaos suite: thousands of results through two consumers while everything around them fails.

A private broker node and PostgreSQL; a few thousand realistic results (captured sioworkersd
environs re-addressed to waiting jobs) mixed with malformed ones and resends; two consumer
processes; and a chaos thread that, over and over, SIGKILLs a consumer (and starts another),
restarts the broker, terminates the consumers' database sessions, and takes the database away for
longer than the in-process retry budget (once with a consumer killed in the middle of it).

At the end: every valid result applied exactly once and its recipe run to completion (a stranded
job fails the test), every malformed message in the dead-letter queue with its reason, the results
and retry queues empty, and both consumers alive and stopping cleanly on SIGTERM.

``CHAOS_RESULTS`` (default 2000) sets the number of valid results.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest
from django.db.models import Count

from consumer.errors import TransportError
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.models import PendingRun, ReceivedResult
from tests.conftest import BrokerClient, ConsumerProcess, make_settings, result_for
from tests.faults import PgFaults, consumer_database_url, queue_counts, waiting_jobs
from tests.recipeapp.models import StepLog

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

VALID = int(os.environ.get("CHAOS_RESULTS", "2000"))
#: Seconds over which the results are published, so that the chaos meets a steady stream.
PUBLISH_SECONDS = 60.0
#: Seconds the database stays away in an outage; the consumers' in-process budget is about 1 s.
OUTAGE_SECONDS = 4.0
#: Each kind of fault happens at least this often, and for as long as results are published.
MIN_EACH = 2


def malformed(i: int) -> tuple[bytes, str]:
    """The i-th malformed body and the reason it must be dead-lettered with."""
    kinds: list[tuple[bytes, str]] = [
        (b"\x80\x81 not utf-8 %d" % i, "undecodable"),
        (b"{not json %d" % i, "undecodable"),
        (b"[%d]" % i, "invalid"),
        (json.dumps({"workers_jobs": {"job0": {}}, "n": i}).encode(), "invalid"),
        (json.dumps({"workers_jobs.results": {}, "n": i}).encode(), "rejected"),
        (
            json.dumps({"error": {}, "job_id": f"j{i}", "saved_environ_id": "x"}).encode(),
            "rejected",
        ),
    ]
    if i % 25 == 0:
        return b"[" * 100_000, "undecodable"  # the JSON decoder's recursion limit
    return kinds[i % len(kinds)]


@dataclass
class Message:
    body: bytes
    message_id: str
    job_id: str | None = None  # valid results only
    reason: str | None = None  # malformed ones only


@dataclass
class Numbers:
    kills: int = 0
    broker_restarts: int = 0
    terminations: int = 0
    sessions_terminated: int = 0
    outages: int = 0
    kills_in_outage: int = 0
    publish_retries: int = 0
    events: list[str] = field(default_factory=list)


class Publisher(threading.Thread):
    """Publishes every message once confirmed, reconnecting through broker restarts."""

    def __init__(self, client: BrokerClient, messages: list[Message], numbers: Numbers) -> None:
        super().__init__(name="publisher", daemon=True)
        self.client = client
        self.messages = messages
        self.numbers = numbers
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._publish_all()
        except BaseException as e:
            self.error = e

    def _publish_all(self) -> None:
        s = self.client.settings
        interval = PUBLISH_SECONDS / len(self.messages)
        conn, channel = None, None
        for i, message in enumerate(self.messages):
            props = pika.BasicProperties(
                delivery_mode=2, message_id=message.message_id, timestamp=int(time.time())
            )
            while True:
                try:
                    if conn is None or not conn.is_open:
                        conn, channel = self.client._channel()
                    channel.basic_publish(
                        s.exchange, s.routing_key, message.body, props, mandatory=True
                    )
                    break
                except (pika.exceptions.AMQPError, TransportError, OSError):
                    # Unconfirmed (or the node refused the connection while it restarts): publish again (a resend is what a worker would do too).
                    self.numbers.publish_retries += 1
                    conn = None
                    time.sleep(0.5)
            if i % 20 == 0:
                time.sleep(20 * interval)
        if conn is not None and conn.is_open:
            conn.close()


class Chaos(threading.Thread):
    def __init__(
        self,
        node: Any,
        pg: PgFaults,
        consumers: list[ConsumerProcess],
        start: Callable[[], ConsumerProcess],
        publisher: Publisher,
        numbers: Numbers,
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.node = node
        self.pg = pg
        self.consumers = consumers
        self.start_consumer = start
        self.publisher = publisher
        self.numbers = numbers
        self.rng = random.Random(4)
        self.error: BaseException | None = None
        self.started = time.monotonic()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:
            self.error = e
        finally:
            if self.pg.down:
                self.pg.restore()

    def _log(self, event: str) -> None:
        self.numbers.events.append(f"{time.monotonic() - self.started:6.1f} s {event}")

    def _run(self) -> None:
        cycle = [
            "kill",
            "terminate",
            "broker",
            "outage",
            "kill",
            "terminate",
            "outage-kill",
            "broker",
        ]
        done: Counter[str] = Counter()
        i = 0
        while self.publisher.is_alive() or min(done[k] for k in cycle) < MIN_EACH:
            self._check_alive()
            kind = cycle[i % len(cycle)]
            getattr(self, "_" + kind.replace("-", "_"))()
            done[kind] += 1
            i += 1
            time.sleep(1 + self.rng.random() * 1.5)
        self._check_alive()

    def _check_alive(self) -> None:
        for c in self.consumers:
            if not c.alive():
                raise AssertionError(f"a consumer died by itself ({c.proc.returncode}):\n{c.log}")

    def _kill(self) -> None:
        n = self.rng.randrange(len(self.consumers))
        self.consumers[n].proc.send_signal(signal.SIGKILL)
        self.consumers[n].proc.wait(10)
        self.numbers.kills += 1
        self._log(f"SIGKILL consumer {n}")
        self.consumers[n] = self.start_consumer()

    def _terminate(self) -> None:
        cut = 0
        for _ in range(4):
            cut += self.pg.terminate()
            time.sleep(0.25)
        self.numbers.terminations += 1
        self.numbers.sessions_terminated += cut
        self._log(f"terminated {cut} database sessions")

    def _broker(self) -> None:
        self._log("broker stop_app")
        self.node.stop_app()
        time.sleep(2)
        self.node.start_app()
        self.numbers.broker_restarts += 1
        self._log("broker start_app")

    def _outage(self, kill: bool = False) -> None:
        self.pg.outage()
        self.numbers.outages += 1
        self._log("database away")
        if kill:
            time.sleep(OUTAGE_SECONDS / 2)
            self._kill()
            self.numbers.kills_in_outage += 1
            time.sleep(OUTAGE_SECONDS / 2)
        else:
            time.sleep(OUTAGE_SECONDS)
        self.pg.restore()
        self._log("database back")

    def _outage_kill(self) -> None:
        self._outage(kill=True)


def test_chaos(private_broker, start_consumer, waiting_job, caplog):
    began = time.monotonic()
    settings = make_settings(private_broker.url, max_retries=2, delivery_limit=20)
    client = BrokerClient(settings)

    # Given VALID waiting jobs, their results, malformed messages and resends, shuffled
    template = waiting_job()
    jobs = [template, *waiting_jobs(template, VALID - 1)]
    rng = random.Random(7)
    messages: list[Message] = []
    for sent in jobs:
        result = result_for(sent)
        messages.append(Message(json.dumps(result).encode(), result["group_id"], sent["job_id"]))
    resends = [
        Message(m.body, m.message_id if i % 2 else "again-" + m.message_id, m.job_id)
        for i, m in enumerate(rng.sample(messages, VALID // 50))
    ]
    bad = [
        Message(body, f"bad-{i}", reason=reason)
        for i, (body, reason) in ((i, malformed(i)) for i in range(VALID // 20))
    ]
    messages += resends + bad
    rng.shuffle(messages)
    setup_seconds = time.monotonic() - began

    env = {
        "DATABASE_URL": consumer_database_url(),
        "EVALMGR_RUN_LEASE_SECONDS": "8",
        "RESULTS_DB_RETRY_ATTEMPTS": "3",
        "RESULTS_DB_RETRY_MAX": "0.3",
        "RESULTS_DB_PROBE_MAX": "1",
    }

    def start() -> ConsumerProcess:
        return start_consumer(settings=settings, ready=False, **env)

    consumers = [start_consumer(settings=settings, **env) for _ in range(2)]
    numbers = Numbers()
    pg = PgFaults()
    publisher = Publisher(client, messages, numbers)
    chaos = Chaos(private_broker, pg, consumers, start, publisher, numbers)

    # When they are published while the chaos runs (quietly: pika logs each refused connection)
    caplog.set_level(logging.CRITICAL, logger="pika")
    chaos_began = time.monotonic()
    publisher.start()
    chaos.start()
    try:
        publisher.join(PUBLISH_SECONDS * 4)
        chaos.join(PUBLISH_SECONDS * 4)
    finally:
        pg.close()
    chaos_seconds = time.monotonic() - chaos_began
    assert not publisher.is_alive() and publisher.error is None, publisher.error
    assert not chaos.is_alive() and chaos.error is None, chaos.error

    # Then, once the consumers have caught up, every valid result was applied exactly once
    def settled() -> bool:
        return (
            not QueuedJob.objects.exists()
            and not PendingRun.objects.exists()
            and queue_counts(private_broker, settings.queue) == (0, 0)
            and queue_counts(private_broker, settings.retry_queue) == (0, 0)
        )

    deadline = time.monotonic() + 120
    lost_since: float | None = None
    while not settled():
        # Jobs still waiting while no message is left in the queues (the broker refreshes its
        # counts every few seconds, hence the grace): their results are lost.
        waiting = QueuedJob.objects.filter(state="WAITING").count()
        if waiting and queue_counts(private_broker, settings.queue) == (0, 0):
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > 20:
                dead = client.depth(settings.dead_letter_queue)
                pytest.fail(
                    f"{waiting} results lost: their jobs still wait, and the results queue is "
                    f"empty (dead-letter queue: {dead}, malformed: {len(bad)})\n"
                    + "\n".join(numbers.events)
                )
        else:
            lost_since = None
        if time.monotonic() > deadline:
            left = list(QueuedJob.objects.values_list("state", flat=True))
            runs = list(PendingRun.objects.values("job_id", "attempts", "claimed_until"))
            pytest.fail(
                f"not settled: jobs left {Counter(left)}, pending runs {runs[:5]} "
                f"({len(runs)}), results {queue_counts(private_broker, settings.queue)}, "
                f"retry {queue_counts(private_broker, settings.retry_queue)}\n"
                + "\n".join(numbers.events)
            )
        for c in consumers:
            assert c.alive(), f"a consumer died:\n{c.log}"
        time.sleep(1)
    drain_seconds = time.monotonic() - chaos_began - chaos_seconds

    job_ids = {sent["job_id"] for sent in jobs}
    ran = dict(
        StepLog.objects.filter(step="after-results")
        .values_list("job_id")
        .annotate(n=Count("id"))
        .values_list("job_id", "n")
    )
    assert set(ran) == job_ids, f"{len(job_ids - set(ran))} jobs never ran their recipe"
    twice = {j: n for j, n in ran.items() if n != 1}
    assert not twice, f"{len(twice)} recipes ran more than once"
    resumed = Counter(
        ReceivedResult.objects.filter(outcome="resumed").values_list("job_id", flat=True)
    )
    assert set(resumed) == job_ids and set(resumed.values()) == {1}
    assert not SavedEnviron.objects.exists()

    # And every malformed message is in the dead-letter queue with its reason, and only those
    dead = client.drain(settings.dead_letter_queue)
    found = {(p.message_id, (p.headers or {}).get("x-oioioi-reason")) for p, _ in dead}
    assert found == {(m.message_id, m.reason) for m in bad}
    copies = len(dead) - len(found)

    # And no consumer is stuck: both stop cleanly
    for c in consumers:
        assert c.alive()
        assert c.stop(60) == 0, c.log

    total = time.monotonic() - began
    print(
        f"\nchaos: {VALID} valid results + {len(resends)} resends + {len(bad)} malformed "
        f"= {len(messages)} messages, 2 consumers, "
        f"{numbers.kills} SIGKILLs ({numbers.kills_in_outage} during an outage), "
        f"{numbers.broker_restarts} broker restarts, {numbers.terminations} rounds of session "
        f"terminations ({numbers.sessions_terminated} sessions), {numbers.outages} database "
        f"outages of {OUTAGE_SECONDS:.0f} s, {numbers.publish_retries} publishes repeated, "
        f"{copies} extra dead-letter copies; setup {setup_seconds:.0f} s, chaos "
        f"{chaos_seconds:.0f} s, drain {drain_seconds:.0f} s, total {total:.0f} s\n"
        + "\n".join(numbers.events)
    )
