"""Passes over the dead-letter queue itself: browse it, replay, discard or purge dead letters.

(The operator pages and commands work on the archive instead, :mod:`results_dead_letters.archive`;
``results_status`` browses, ``results_deadletters purge`` purges.)

Every pass over the queue goes from its head, on one channel in confirm mode,
bounded by the queue's depth when the pass starts (messages dead-lettered meanwhile, a replayed
message failing again among them, wait for the next pass; without the bound a replay of a message
that still fails would chase it round forever). Each message taken is settled in exactly one way:

*replayed*
    republished to the results exchange (persistent, mandatory, confirmed), and only then acked;
*discarded*
    acked;
*kept*
    put back where it was. How depends on the queue type, because only a classic queue puts a
    requeued message back in its place. A quorum queue (RabbitMQ 3.10, measured) requeues a batch
    of returns in hash order once it holds more than 32, and RabbitMQ 4.0 to 4.2 count every
    return against a default delivery limit of 20, past which a queue without a dead-letter
    exchange (this one) drops the message. So a kept message of a quorum queue is never
    requeued: an identical copy is published to the queue's tail, confirmed, and then the
    original is acked. A pass over a quorum queue therefore always goes round the whole queue,
    which leaves it in the order it had.

Nothing is ever lost: every ack follows a confirmed publish, or drops a message on purpose. A
pass cut short (the process killed, the connection lost) leaves every message it had not settled
in the queue. At worst a message is then both replayed and still dead-lettered (replaying it again
is harmless: the consumer's inbox recognises it), a quorum queue holds a kept message twice, or
its order has moved round. While a pass runs, the messages it holds are invisible to other
readers, so two passes at once may each see part of the queue.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from consumer import topology
from consumer.config import Settings
from consumer.errors import BrokerRefused, PublishError
from consumer.transport import AmqpProperties, Channel, Connection
from results_dead_letters.errors import (
    TopologyMismatch,
    exchange_must_exist,
    queue_must_exist,
)
from results_dead_letters.letters import DeadLetter, from_message, replay_properties

#: The queue library's logger tree, so one logging setup covers every line of the return path.
log = logging.getLogger("consumer.deadletters")

Progress = Callable[[int, int], None]


class _Message:
    """A message taken from the queue and not yet settled."""

    def __init__(self, tag: int, properties: AmqpProperties, body: bytes) -> None:
        self.tag = tag
        self.properties = properties
        self.body = body
        self.settled = False


class _Pass:
    """One channel on one connection, taking the dead-letter queue from its head."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue = settings.dead_letter_queue
        self.requeues = settings.queue_type == "classic"
        self._held: list[int] = []
        # The first node of AMQP_URL that answers (a ConnectionClosed naming each if none does).
        self._connection = Connection(settings, name="oioioi-deadletters")
        try:
            self._channel = self._open_checked_channel()
        except BaseException:
            self.close()
            raise

    def _open_checked_channel(self) -> Channel:
        with self._connection.doing("checking the dead-letter queue"):
            # A passive declare that fails closes its channel, so it gets one of its own; and
            # nothing is created here: a wrong queue name must not look like an empty queue.
            probe = self._connection.channel()
            queue_must_exist(probe, self.queue, "the dead-letter queue")
            probe.close()
            channel = self._connection.channel()
            try:
                # Declared again with its arguments: the broker refuses if the queue's type is
                # not the configured one, and the way kept messages are put back depends on it.
                # (Not where the broker's definitions hold the topology and we may not declare.)
                if self.settings.declare_topology:
                    channel.declare_queue(
                        self.queue, topology.dead_letter_queue_arguments(self.settings)
                    )
            except BrokerRefused as e:
                if e.reply_code == 406:
                    raise TopologyMismatch(
                        f"the dead-letter queue {self.queue!r} is not a "
                        f"{self.settings.queue_type} queue as configured: {e.reply_text}"
                    ) from None
                raise
            channel.confirm()
            return channel

    def check_results_exchange(self) -> None:
        with self._connection.doing("checking the results exchange"):
            probe = self._connection.channel()
            exchange_must_exist(probe, self.settings.exchange, "the results exchange")
            probe.close()

    def depth(self) -> int:
        with self._connection.doing("counting the dead-letter queue"):
            return self._channel.queue_state(self.queue).messages

    def take(self) -> _Message | None:
        with self._connection.doing("reading the dead-letter queue"):
            got = self._channel.get(self.queue)
        if got is None:
            return None
        return _Message(got.tag, got.properties, got.body)

    def drop(self, message: _Message) -> None:
        with self._connection.doing("acknowledging a dead letter"):
            self._channel.ack(message.tag)
        message.settled = True

    def replay(self, message: _Message) -> None:
        """Republish to the results exchange, then ack; raises :class:`PublishError` if refused.

        A refusal (unroutable, nacked) leaves the message unsettled and the channel usable.
        """
        with self._connection.doing("replaying"):
            self._channel.publish(
                self.settings.exchange,
                self.settings.routing_key,
                message.body,
                replay_properties(message.properties),
            )
        self.drop(message)

    def keep(self, message: _Message) -> None:
        if self.requeues:
            # Held until the pass ends; requeued then, a classic queue puts it back in its place.
            self._held.append(message.tag)
        else:
            with self._connection.doing("keeping a dead letter"):
                self._channel.publish("", self.queue, message.body, message.properties)
            self.drop(message)
        message.settled = True

    def is_usable(self) -> bool:
        return self._channel.is_open

    def purge(self) -> int:
        with self._connection.doing("purging the dead-letter queue"):
            return self._channel.purge(self.queue)

    def finish(self) -> None:
        if not self._held:
            return
        held = len(self._held)
        with self._connection.doing("putting kept dead letters back"):
            others = self.depth()
            self._channel.requeue(self._held[-1], multiple=True)
            self._held.clear()
            # The queue requeues in the background and answers a count before it is done (a
            # count jumps the queue's mailbox): wait for it, so that the next pass, which
            # counts first, sees every message. More may arrive meanwhile, never fewer, unless
            # another reader takes some: so the wait is bounded.
            deadline = time.monotonic() + max(5.0, held / 200)
            while self.depth() < others + held and time.monotonic() < deadline:
                self._connection.sleep(0.02)

    def close(self) -> None:
        # Whatever is still unsettled returns to the queue when the connection closes.
        self._connection.close()


#: What a visitor tells the pass after seeing a message: go on, or nothing more is needed.
_CONTINUE, _DONE = True, False


def _run_pass(
    settings: Settings,
    visit: Callable[[_Pass, _Message], bool],
    progress: Progress | None = None,
    *,
    before: Callable[[_Pass], None] | None = None,
) -> None:
    """Take each message once, let ``visit`` settle it (or keep it), and put the rest back."""
    dlq = _Pass(settings)
    try:
        if before is not None:
            before(dlq)
        total = dlq.depth()
        wanted = True
        for done in range(1, total + 1):
            # A classic queue keeps the untaken rest in place; a quorum queue's kept messages go
            # to its tail, so the whole queue goes round to keep its order.
            if not wanted and dlq.requeues:
                break
            message = dlq.take()
            if message is None:
                break  # someone else took the rest meanwhile
            if wanted:
                wanted = visit(dlq, message)
            if not message.settled:
                dlq.keep(message)
            if progress is not None:
                progress(done, total)
        dlq.finish()
    except BaseException:
        # Closing would requeue what is held too, but without waiting for it; the next reader
        # should find the queue whole. (If the connection is what failed, this fails at once.)
        with contextlib.suppress(Exception):
            dlq.finish()
        raise
    finally:
        dlq.close()


# --- the operations ----------------------------------------------------------------------------------


def browse(settings: Settings, limit: int | None = None) -> list[DeadLetter]:
    """The first ``limit`` dead letters (all by default), oldest first; the queue is unchanged."""
    found: list[DeadLetter] = []

    def visit(dlq: _Pass, message: _Message) -> bool:
        found.append(from_message(message.properties, message.body))
        return limit is None or len(found) < limit

    if limit is not None and limit <= 0:
        return found
    _run_pass(settings, visit)
    return found


def get(settings: Settings, dead_letter_id: str) -> DeadLetter | None:
    """The dead letter with this id (the first, if copies share it); the queue is unchanged."""
    found: list[DeadLetter] = []

    def visit(dlq: _Pass, message: _Message) -> bool:
        letter = from_message(message.properties, message.body)
        if letter.id == dead_letter_id:
            found.append(letter)
            return _DONE
        return _CONTINUE

    _run_pass(settings, visit)
    return found[0] if found else None


def depth(settings: Settings) -> int:
    """How many dead letters are ready (not counting those a pass holds right now)."""
    dlq = _Pass(settings)
    try:
        return dlq.depth()
    finally:
        dlq.close()


@dataclass
class ReplayReport:
    """What a replay did; every message not replayed is still in the dead-letter queue."""

    #: Republished to the results exchange, confirmed, and removed from the dead-letter queue.
    replayed: int = 0
    #: Looked at and not selected (another id, another reason, or past the limit).
    skipped: int = 0
    #: Selected but refused by the broker (unroutable, nacked): left in the dead-letter queue.
    failed: int = 0
    #: ``(dead-letter id, why)`` of each failure.
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: Requested ids that no message had (replayed or discarded meanwhile, or mistyped).
    not_found: list[str] = field(default_factory=list)


def replay(
    settings: Settings,
    ids: Collection[str] | None = None,
    *,
    reason: str | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> ReplayReport:
    """Send selected dead letters back to the results exchange, each removed once confirmed.

    Selected are those whose id is in ``ids`` (every one if ``ids`` is None), of ``reason`` if
    given, at most ``limit`` of them. A replayed copy keeps the body, message id and properties;
    it loses the ``x-oioioi-*`` failure headers (so it gets a fresh retry budget) and the broker's
    dead-lettering headers, and counts ``x-oioioi-replays`` up by one.
    """
    report = ReplayReport()
    wanted_ids = set(ids) if ids is not None else None
    seen: set[str] = set()

    def selected(letter: DeadLetter) -> bool:
        if wanted_ids is not None and letter.id not in wanted_ids:
            return False
        if reason is not None and letter.reason != reason:
            return False
        return limit is None or report.replayed + report.failed < limit

    def visit(dlq: _Pass, message: _Message) -> bool:
        letter = from_message(message.properties, message.body)
        seen.add(letter.id)
        if not selected(letter):
            report.skipped += 1
            return _CONTINUE
        try:
            dlq.replay(message)
        except PublishError as e:
            if not dlq.is_usable():
                raise
            report.failed += 1
            report.failures.append((letter.id, str(e)))
            log.warning("Dead letter %r could not be replayed: %s", letter.id, e)
        else:
            report.replayed += 1
            log.info(
                "Dead letter %r replayed.",
                letter.id,
                extra={"message_id": letter.message_id, "job_id": letter.job_id},
            )
        # Always the whole pass: copies of one message share its id, and all go.
        return _CONTINUE

    if limit is not None and limit <= 0:
        return report
    _run_pass(settings, visit, progress, before=_Pass.check_results_exchange)
    if wanted_ids is not None:
        report.not_found = sorted(wanted_ids - seen)
    return report


def discard(settings: Settings, ids: Collection[str], progress: Progress | None = None) -> int:
    """Remove the dead letters with these ids for good; returns how many were removed."""
    wanted = set(ids)
    discarded = 0

    def visit(dlq: _Pass, message: _Message) -> bool:
        nonlocal discarded
        letter = from_message(message.properties, message.body)
        if letter.id in wanted:
            dlq.drop(message)
            discarded += 1
            log.info("Dead letter %r discarded.", letter.id)
        return _CONTINUE

    if wanted:
        _run_pass(settings, visit, progress)
    return discarded


def purge(settings: Settings) -> int:
    """Remove every dead letter (not those another pass holds right now); returns how many."""
    dlq = _Pass(settings)
    try:
        purged = dlq.purge()
    finally:
        dlq.close()
    log.warning("Dead-letter queue %r purged: %d message(s) removed.", dlq.queue, purged)
    return purged

