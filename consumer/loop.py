"""The consume loop: connect, receive, decode, write, then ack, dead-letter or wait for the database.

What happens to each message, and why, is stated once in :mod:`consumer.policy`.

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
    PermanentError,
    PublishError,
    TransportError,
    UndecodableMessage,
    WriteKeepsFailing,
)
from consumer.observe import Observer
from consumer.retry import Backoff, database_retrying
from consumer.transport import Delivery, Transport

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Rounds of "the write failed with transient errors, yet the database answered the probe at
#: once" after which the error is taken to be the message's (see consumer.policy).
_ANSWERED_ROUNDS = 3


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


class _Stopping(Exception):
    """Raised inside the loop when shutdown was asked for while a message was in hand."""


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
                except _Stopping:
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
            try:
                result = decode(delivery.body, delivery.message_id)
                if self.store.check is not None:
                    self.store.check(result.env)
            except PermanentError as e:
                self._dead_letter(transport, delivery, e)
                continue
            except Exception as e:
                # The decoder tripped over the body itself (JSON nested past the recursion
                # limit): still the message's fault, and no reason to crash.
                error = UndecodableMessage(f"body could not be decoded: {type(e).__name__}: {e}")
                self._dead_letter(transport, delivery, error)
                continue
            (suspects if policy.suspect(delivery) else fresh).append((delivery, result))
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
        except (TransportError, _Stopping):
            # The broker went away while the write ran; that says nothing about the message.
            raise
        except Exception as e:
            if len(items) > 1:
                log.info("Batch of %d failed (%s); writing its messages one by one.", len(items), e)
                for item in items:
                    self._write(transport, [item])
            else:
                self._failed(transport, items[0][0], e)
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
            if attempts > self.settings.delivery_limit:
                error = DeliveryLimitExceeded(
                    f"redelivered {attempts} times, each time after its consumer died or lost "
                    f"the broker with it in hand (limit {self.settings.delivery_limit})"
                )
                self._dead_letter(transport, delivery, error)
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
        except (TransportError, _Stopping):
            raise
        except Exception:
            # Without the count the message is written as if it were its first attempt: a
            # lost count can cost another crash, never the message.
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
            except DatabaseUnavailable as e:
                if self._await_database(transport, e):
                    answered = 0
                    continue
                answered += 1
                if answered >= _ANSWERED_ROUNDS:
                    raise WriteKeepsFailing(
                        f"failed {answered} times with {e} while the database answered"
                    ) from e.__cause__

    def _retrying(self, func: Callable[[], T]) -> T:
        retrying = database_retrying(
            self.settings, self.store.transient, self.shutdown, self.store.reset
        )
        try:
            return retrying(func)
        except self.store.transient as e:
            raise DatabaseUnavailable(f"{type(e).__name__}: {e}") from e

    def _log_outcomes(self, items: list[tuple[Delivery, Result]], outcomes: Sequence[str]) -> None:
        now = time.time()
        for (delivery, result), outcome in zip(items, outcomes, strict=True):
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

    # --- ack or dead-letter ----------------------------------------------------------------

    def _failed(self, transport: Transport, delivery: Delivery, error: Exception) -> None:
        if isinstance(error, PermanentError):
            self._dead_letter(transport, delivery, error)
        elif policy.retries(delivery) >= self.settings.max_retries:
            log.error(
                "Message %r failed %d times; giving up.",
                delivery.message_id,
                policy.retries(delivery) + 1,
                exc_info=error,
                extra={"message_id": delivery.message_id, "outcome": "dead-lettered"},
            )
            self._dead_letter(transport, delivery, error, with_traceback=True)
        else:
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

    def _dead_letter(
        self,
        transport: Transport,
        delivery: Delivery,
        error: BaseException,
        *,
        with_traceback: bool = False,
    ) -> None:
        props = policy.dead_letter_properties(
            delivery, error, self.settings.queue, with_traceback=with_traceback
        )
        self._publish_copy(transport, self.settings.dead_letter_queue, delivery.body, props)
        reason = policy.reason_of(error)
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
                raise _Stopping()
            try:
                self._on_db(transport, self._probe)
            except TransportError:
                raise
            except Exception as e:
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
            except self.store.transient:
                self.observer.database_up(False)
                log.warning("Sweeping abandoned runs failed.", exc_info=True)
                return
            except Exception:
                log.warning("Sweeping abandoned runs failed.", exc_info=True)
            self.observer.database_up(True)

        self._on_db(transport, sweep)

    def _on_db(self, transport: Transport, func: Callable[[], T]) -> T:
        assert self._db is not None
        return transport.wait(self._db.submit(func))
