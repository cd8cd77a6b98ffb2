"""The consume loop: connect, receive, decode, write, then ack, dead-letter or wait for the database.

What happens to each message, and why, is stated once in :mod:`consumer.policy`, and decided there
by :func:`~consumer.policy.decide`: the loop asks it at each step and carries its answer out.

Threads: the main thread owns the broker connection and keeps it serviced (heartbeats, incoming
deliveries) while all database work runs on one dedicated thread, so a write that takes longer than
two heartbeat intervals never costs the connection. The database thread is the only one that
touches the database, which keeps its connection (thread-local in Django) in one place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from consumer import policy
from consumer.config import Settings
from consumer.decode import Result, decode
from consumer.errors import (
    ConsumerCancelled,
    DatabaseUnavailable,
    DeliveryLimitExceeded,
    PublishError,
    ShuttingDown,
    TransportError,
    WriteKeepsFailing,
)
from consumer.observe import Observer
from consumer.policy import Decision, Facts, Kind, Outcome, Stage
from consumer.retry import Backoff, database_retrying
from consumer.transport import Delivery, Transport

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Store:
    """What the database side provides; every callable runs on the database thread."""

    #: Apply results in one transaction that has committed when it returns; one outcome each
    #: (``committed`` or ``duplicate``). Raises :class:`~consumer.errors.RejectedEnviron` for an
    #: environ the domain refuses.
    write: Callable[[Sequence[Result]], Sequence[str]]
    #: Raise one of ``transient`` while the database is unreachable.
    probe: Callable[[], None]
    #: Drop connections that may be broken, before a new attempt.
    reset: Callable[[], None]
    #: After the ack: hand committed work on (run the resumed recipes). Runs on the database
    #: thread while the main thread keeps the connection serviced; the next batch is taken once
    #: it returns.
    after_ack: Callable[[], None]
    #: At start, then every few seconds whether messages come or not: pick up work others left
    #: behind (abandoned runs). Its answer is also how an idle consumer learns whether the
    #: database is up.
    sweep: Callable[[], None]
    #: Database errors that are worth retrying (connection lost, lock timeout, busy, ...).
    transient: tuple[type[BaseException], ...]
    #: Refuse, without the database, an environ the write would refuse (raises
    #: :class:`~consumer.errors.RejectedEnviron`): it is dead-lettered before the batch is
    #: written, rather than failing the batch and making it fall back to single writes.
    check: Callable[[Mapping[str, Any]], None] | None = None
    #: Classic queues: add one to a message's attempt count, committed; returns the count,
    #: this attempt included, or 0 when the message has already been applied.
    count_attempt: Callable[[str], int] | None = None
    #: Classic queues: drop a message's attempt count once it is settled.
    forget_attempt: Callable[[str], None] | None = None


class ResultsConsumer:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        observer: Observer | None = None,
        transport_factory: Callable[[Settings], Transport] = Transport,
    ) -> None:
        self.settings = settings
        self.store = store
        self.observer = observer or Observer()
        self._transport_factory = transport_factory
        self.shutdown = threading.Event()
        self._db: ThreadPoolExecutor | None = None
        self._last_sweep = 0.0

    def stop(self) -> None:
        """Take nothing new; the batch in hand is finished and settled first."""
        self.shutdown.set()

    # --- connect ---------------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(0.5, self.settings.reconnect_max)
        #: When the broker connection was lost (or first refused); None while consuming.
        lost_at: float | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="database") as self._db:
            self._db.submit(self._sweep_at_start).result()
            while not self.shutdown.is_set():
                try:
                    with self._transport_factory(self.settings) as transport:
                        self.observer.connected(True)
                        if lost_at is None:
                            log.info(
                                "Consuming from %r on %s.", self.settings.queue, transport.node_url
                            )
                        else:
                            self.observer.reconnected()
                            log.info(
                                "Consuming from %r on %s again, %.1f s after the broker "
                                "connection was lost.",
                                self.settings.queue,
                                transport.node_url,
                                time.monotonic() - lost_at,
                            )
                        lost_at = None
                        backoff.reset()
                        self._consume(transport)
                except TransportError as e:
                    self.observer.connected(False)
                    delay = backoff.next()
                    # One line per attempt; which node was lost, and which answers again, the
                    # transport says once for the process (consumer.brokers).
                    if isinstance(e, ConsumerCancelled):
                        log.warning(
                            "The broker cancelled the consumer (its queue's leader moved, or the "
                            "queue is gone); subscribing again in %.1f s.",
                            delay,
                        )
                    else:
                        log.log(
                            logging.WARNING if lost_at is None else logging.INFO,
                            "Broker unavailable (%s); reconnecting in %.1f s.",
                            e,
                            delay,
                        )
                    if lost_at is None:
                        lost_at = time.monotonic()
                    self.shutdown.wait(delay)
                except ShuttingDown:
                    break
        self.observer.connected(False)
        log.info("Consumer stopped.")

    # --- receive ---------------------------------------------------------------------------

    def _consume(self, transport: Transport) -> None:
        while not self.shutdown.is_set():
            deliveries = transport.receive(
                self.settings.batch_size, self.settings.idle_tick, self.settings.batch_bytes
            )
            if deliveries:
                self.observer.received(len(deliveries))
                wrote = self._handle(transport, deliveries)
                # The batch is settled: its bodies go before the recipes run, which may hold
                # the environs they resumed (large results: a batch's bytes again).
                del deliveries
                if wrote:
                    self._on_db(transport, self._after_ack)
            # Not only when idle: under steady load a consumer is never idle, and runs a dead
            # peer left behind would wait for the load to drop.
            self._sweep_if_due(transport)

    def _handle(self, transport: Transport, deliveries: list[Delivery]) -> bool:
        """Decode, write, then ack the batch; returns whether anything was written."""
        fresh: list[tuple[Delivery, Result]] = []
        suspects: list[tuple[Delivery, Result]] = []
        for delivery in deliveries:
            facts = policy.facts(delivery, Stage.DECODE)
            try:
                result = decode(delivery.body, delivery.message_id, self.store.check)
            except Exception as e:
                self._settle(transport, delivery, e, self._decide(self._kind(e), facts))
                continue
            way = self._decide(Kind.NONE, facts).outcome
            (suspects if way is Outcome.WRITE_ALONE else fresh).append((delivery, result))
        if fresh:
            self._write(transport, fresh)
        for item in suspects:
            self._write_suspect(transport, item)
        # Every delivery of the batch has a durable outcome now (committed, or its copy
        # confirmed by the broker), and tags only grow on a channel: one ack settles them all.
        transport.ack(deliveries[-1], multiple=True)
        return bool(fresh or suspects)

    # --- write -----------------------------------------------------------------------------

    def _write(self, transport: Transport, items: list[tuple[Delivery, Result]]) -> None:
        results = [result for _, result in items]
        started = time.monotonic()
        try:
            outcomes = self._with_database(transport, lambda: self.store.write(results))
        except Exception as e:
            delivery = items[0][0]
            facts = Facts(batch=len(items)) if len(items) > 1 else policy.facts(delivery)
            decision = self._decide(self._kind(e), facts)
            if decision.outcome is Outcome.WRITE_ALONE:
                log.info("Batch of %d failed (%s); writing its messages one by one.", len(items), e)
                for item in items:
                    self._write(transport, [item])
            else:
                self._settle(transport, delivery, e, decision)
            return
        self.observer.write_seconds(time.monotonic() - started, len(items))
        self.observer.database_up(True)
        self._log_outcomes(items, outcomes)

    def _write_suspect(self, transport: Transport, item: tuple[Delivery, Result]) -> None:
        # On its own: if this is the message that killed the previous consumer and it does so
        # again, no other message is charged for it.
        delivery, result = item
        counted = self.settings.queue_type == "classic" and self.store.count_attempt is not None
        if counted:
            attempts = self._count_attempt(transport, result.key)
            facts = policy.facts(delivery, Stage.COUNT, attempts=attempts)
            decision = self._decide(Kind.NONE, facts)
            if decision.outcome is not Outcome.WRITE_ALONE:
                error = DeliveryLimitExceeded(
                    f"redelivered {attempts} times, each time after its consumer died or lost "
                    f"the broker with it in hand (limit {self.settings.delivery_limit})"
                )
                self._settle(transport, delivery, error, decision)
                self._forget_attempt(transport, result.key)
                return
        self._write(transport, [item])
        if counted:
            self._forget_attempt(transport, result.key)

    def _count_attempt(self, transport: Transport, key: str) -> int:
        count = self.store.count_attempt
        assert count is not None
        try:
            return self._with_database(transport, lambda: count(key))
        except Exception as e:
            decision = self._decide(self._kind(e), Facts(stage=Stage.COUNT))
            if decision.outcome is Outcome.LEFT_UNACKED:
                raise
            # Written alone, as if this were its first attempt.
            log.warning("Could not count the attempts of %r.", key, exc_info=True)
            return 1

    def _forget_attempt(self, transport: Transport, key: str) -> None:
        forget = self.store.forget_attempt
        if forget is None:
            return

        def quietly() -> None:
            try:
                forget(key)
            except Exception:
                log.debug("Could not drop the attempt count of %r.", key, exc_info=True)

        self._on_db(transport, quietly)

    def _with_database(self, transport: Transport, func: Callable[[], T]) -> T:
        """Run ``func`` on the database thread, retrying transient errors in-process; past that
        budget the database is away: hold on, probe it, and run ``func`` again once it answers."""
        answered = 0
        while True:
            try:
                return self._on_db(transport, lambda: self._retrying(func))
            except Exception as e:
                if self._kind(e) is not Kind.DATABASE_AWAY:
                    raise
                answered = 0 if self._await_database(transport, e) else answered + 1
                facts = Facts(answered_rounds=answered)
                if self._decide(Kind.DATABASE_AWAY, facts).outcome is not Outcome.HELD:
                    raise WriteKeepsFailing(
                        f"failed {answered} times with {e} while the database answered"
                    ) from e.__cause__

    def _retrying(self, func: Callable[[], T]) -> T:
        retrying = database_retrying(
            self.settings, self.store.transient, self.shutdown, self.store.reset
        )
        try:
            return retrying(func)
        except Exception as e:
            if self._kind(e) is Kind.DATABASE_AWAY:
                raise DatabaseUnavailable(f"{type(e).__name__}: {e}") from e
            raise

    def _log_outcomes(self, items: list[tuple[Delivery, Result]], outcomes: Sequence[str]) -> None:
        now = time.time()
        for (delivery, result), answer in zip(items, outcomes, strict=True):
            facts = Facts(duplicate=answer == Outcome.DUPLICATE.value)
            outcome = self._decide(Kind.NONE, facts).outcome.value
            self.observer.settled(outcome)
            if delivery.properties.timestamp:
                self.observer.age_seconds(max(0.0, now - delivery.properties.timestamp))
            log.info(
                "Result %r %s.",
                result.key,
                outcome,
                extra={
                    "message_id": result.message_id,
                    "job_id": result.job_id,
                    "group_id": result.group_id,
                    "outcome": outcome,
                },
            )

    # --- ask the policy; ack or dead-letter -------------------------------------------------

    def _kind(self, error: BaseException) -> Kind:
        return policy.classify(error, self.store.transient)

    def _decide(self, kind: Kind, facts: Facts) -> Decision:
        return policy.decide(kind, facts, self.settings)

    def _settle(
        self, transport: Transport, delivery: Delivery, error: BaseException, decision: Decision
    ) -> None:
        """Carry out what the policy decided for a message that failed: dead-letter it, send
        it to the retry queue, or leave it unacked (``error`` is raised again)."""
        if decision.outcome is Outcome.LEFT_UNACKED:
            # The broker went away, or shutdown came while the database was away: that says
            # nothing about the message.
            raise error
        if decision.outcome is Outcome.DEAD_LETTERED:
            if decision.with_traceback:
                log.error(
                    "Message %r failed %d times; giving up.",
                    delivery.message_id,
                    policy.retries(delivery) + 1,
                    exc_info=error,
                    extra={"message_id": delivery.message_id, "outcome": "dead-lettered"},
                )
            self._dead_letter(transport, delivery, error, decision)
        elif decision.outcome is Outcome.RETRIED:
            log.warning(
                "Write of message %r failed (%s: %s); retrying in %d ms.",
                delivery.message_id,
                type(error).__name__,
                error,
                self.settings.retry_delay_ms,
                exc_info=error,
                extra={"message_id": delivery.message_id, "outcome": "retried"},
            )
            self._publish_copy(
                transport,
                self.settings.retry_queue,
                delivery.body,
                policy.retry_properties(delivery, error),
            )
            self.observer.settled("retried")
        else:
            raise AssertionError(f"{decision} does not settle a failed message") from error

    def _dead_letter(
        self, transport: Transport, delivery: Delivery, error: BaseException, decision: Decision
    ) -> None:
        reason = decision.reason or policy.reason_of(error)
        props = policy.dead_letter_properties(
            delivery,
            error,
            self.settings.queue,
            reason=reason,
            with_traceback=decision.with_traceback,
        )
        self._publish_copy(transport, self.settings.dead_letter_queue, delivery.body, props)
        self.observer.settled("dead-lettered")
        self.observer.dead_lettered(reason)
        log.warning(
            "Message %r dead-lettered (%s): %s",
            delivery.message_id,
            reason,
            error,
            extra={"message_id": delivery.message_id, "outcome": "dead-lettered"},
        )

    def _publish_copy(self, transport: Transport, queue: str, body: bytes, props: Any) -> None:
        try:
            transport.publish("", queue, body, props)
        except PublishError as e:
            # The copy did not land, so the original must not be acked: reconnect (which
            # declares the queues again) and let the message come back.
            raise TransportError(f"could not publish to {queue!r}: {e}") from e

    # --- the database is away ----------------------------------------------------------------

    def _await_database(self, transport: Transport, error: Exception) -> int:
        """Probe with backoff until the database answers; returns how many probes failed."""
        self.observer.database_pause()
        self.observer.database_up(False)
        log.error("Database unavailable (%s); holding the message and probing.", error)
        backoff = Backoff(self.settings.db_retry_initial, self.settings.db_probe_max)
        started = time.monotonic()
        failed = 0
        while True:
            transport.sleep(backoff.next())
            if self.shutdown.is_set():
                raise ShuttingDown("shutdown asked for while the database was away")
            try:
                self._on_db(transport, self._probe)
            except Exception as e:
                if self._kind(e) is Kind.BROKER_GONE:
                    raise
                # Whatever the probe raises, the database is not answering yet.
                failed += 1
                log.info(
                    "Database still unavailable after %.0f s: %s", time.monotonic() - started, e
                )
                continue
            log.warning("Database is back after %.1f s; resuming.", time.monotonic() - started)
            self.observer.database_up(True)
            return failed

    def _probe(self) -> None:
        self.store.reset()
        self.store.probe()

    # --- after the ack, and the sweep ----------------------------------------------------------

    def _after_ack(self) -> None:
        try:
            self.store.after_ack()
        except Exception:
            log.exception("Running resumed jobs failed; they stay pending and are picked up later.")

    def _sweep_at_start(self) -> None:
        # A consumer killed mid-recipe left its runs behind: look for them before anything else.
        try:
            self.store.sweep()
        except Exception:
            log.warning("Sweeping abandoned runs at start failed.", exc_info=True)

    def _sweep_if_due(self, transport: Transport) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 10 * self.settings.idle_tick:
            return
        self._last_sweep = now

        def sweep() -> None:
            # The sweep is also how an idle consumer learns whether its database answers,
            # which is what its readiness reports.
            try:
                self.store.sweep()
            except Exception as e:
                log.warning("Sweeping abandoned runs failed.", exc_info=True)
                if self._kind(e) is Kind.DATABASE_AWAY:
                    self.observer.database_up(False)
                    return
            self.observer.database_up(True)

        self._on_db(transport, sweep)

    def _on_db(self, transport: Transport, func: Callable[[], T]) -> T:
        assert self._db is not None
        return transport.wait(self._db.submit(func))
