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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from consumer import policy
from consumer.config import Settings
from consumer.decode import Result, decode
from consumer.errors import (
    DatabaseUnavailable,
    PermanentError,
    PublishError,
    TransportError,
)
from consumer.observe import Observer
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
    #: After the ack: hand committed work on (run the resumed recipes).
    after_ack: Callable[[], None]
    #: When idle: pick up work others left behind (abandoned runs).
    idle: Callable[[], None]
    #: Database errors that are worth retrying (connection lost, lock timeout, busy, ...).
    transient: tuple[type[BaseException], ...]


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
        self._last_idle = 0.0

    def stop(self) -> None:
        """Take nothing new; the batch in hand is finished and settled first."""
        self.shutdown.set()

    # --- connect ---------------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(0.5, self.settings.reconnect_max)
        with ThreadPoolExecutor(1, thread_name_prefix="database") as self._db:
            while not self.shutdown.is_set():
                try:
                    with self._transport_factory(self.settings) as transport:
                        if backoff.attempt:
                            self.observer.reconnected()
                        backoff.reset()
                        self.observer.connected(True)
                        log.info("Consuming from %r.", self.settings.queue)
                        self._consume(transport)
                except TransportError as e:
                    self.observer.connected(False)
                    delay = backoff.next()
                    log.warning("Broker unavailable (%s); reconnecting in %.1f s.", e, delay)
                    self.shutdown.wait(delay)
                except _Stopping:
                    break
        self.observer.connected(False)
        log.info("Consumer stopped.")

    # --- receive ---------------------------------------------------------------------------

    def _consume(self, transport: Transport) -> None:
        while not self.shutdown.is_set():
            deliveries = transport.receive(self.settings.batch_size, self.settings.idle_tick)
            if deliveries:
                self.observer.received(len(deliveries))
                self._handle(transport, deliveries)
            else:
                self._idle(transport)

    def _handle(self, transport: Transport, deliveries: list[Delivery]) -> None:
        decoded: list[tuple[Delivery, Result]] = []
        for delivery in deliveries:
            try:
                decoded.append((delivery, decode(delivery.body, delivery.message_id)))
            except PermanentError as e:
                self._dead_letter(transport, delivery, e)
        if decoded:
            self._write(transport, decoded)
        # Every delivery of the batch has a durable outcome now (committed, or its copy
        # confirmed by the broker), and tags only grow on a channel: one ack settles them all.
        transport.ack(deliveries[-1], multiple=True)
        if decoded:
            self._on_db(transport, self._after_ack)

    # --- write -----------------------------------------------------------------------------

    def _write(self, transport: Transport, items: list[tuple[Delivery, Result]]) -> None:
        results = [result for _, result in items]
        while True:
            started = time.monotonic()
            try:
                outcomes = self._on_db(transport, lambda: self._write_with_retries(results))
            except DatabaseUnavailable as e:
                self._await_database(transport, e)
                continue
            except (TransportError, _Stopping):
                # The broker went away while the write ran; that says nothing about the message.
                raise
            except Exception as e:
                if len(items) > 1:
                    log.info(
                        "Batch of %d failed (%s); writing its messages one by one.", len(items), e
                    )
                    for item in items:
                        self._write(transport, [item])
                else:
                    self._failed(transport, items[0][0], e)
                return
            self.observer.write_seconds(time.monotonic() - started, len(items))
            self._log_outcomes(items, outcomes)
            return

    def _write_with_retries(self, results: list[Result]) -> Sequence[str]:
        retrying = database_retrying(
            self.settings, self.store.transient, self.shutdown, self.store.reset
        )
        try:
            return retrying(self.store.write, results)
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

    def _await_database(self, transport: Transport, error: Exception) -> None:
        self.observer.database_pause()
        self.observer.database_up(False)
        log.error("Database unavailable (%s); holding the message and probing.", error)
        backoff = Backoff(self.settings.db_retry_initial, self.settings.db_probe_max)
        started = time.monotonic()
        while True:
            transport.sleep(backoff.next())
            if self.shutdown.is_set():
                raise _Stopping()
            try:
                self._on_db(transport, self._probe)
            except self.store.transient as e:
                log.info(
                    "Database still unavailable after %.0f s: %s", time.monotonic() - started, e
                )
                continue
            log.warning("Database is back after %.1f s; resuming.", time.monotonic() - started)
            self.observer.database_up(True)
            return

    def _probe(self) -> None:
        self.store.reset()
        self.store.probe()

    # --- after the ack, and when idle ----------------------------------------------------------

    def _after_ack(self) -> None:
        try:
            self.store.after_ack()
        except Exception:
            log.exception("Running resumed jobs failed; they stay pending and are picked up later.")

    def _idle(self, transport: Transport) -> None:
        now = time.monotonic()
        if now - self._last_idle < 10 * self.settings.idle_tick:
            return
        self._last_idle = now

        def idle() -> None:
            try:
                self.store.idle()
            except Exception:
                log.warning("Sweeping abandoned runs failed.", exc_info=True)

        self._on_db(transport, idle)

    def _on_db(self, transport: Transport, func: Callable[[], T]) -> T:
        assert self._db is not None
        return transport.wait(self._db.submit(func))
