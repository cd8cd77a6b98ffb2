"""Failure policy: the one known outcome of every message, and the function that decides it.

Every delivery ends in exactly one of the outcomes below, and is acknowledged only after that
outcome is durable (the database commit, or the broker's confirm of the copy we published).
:func:`decide` is the policy as one function: from what happened (an error's :class:`Kind`, named by
:func:`classify`) and what is known about the delivery (:class:`Facts`) to an :class:`Outcome`.
The consume loop (:mod:`consumer.loop`) asks it and carries the answer out; the table in
``tests/test_policy_table.py`` checks it row by row against this list.

``committed``
    Decoded, written by ``delay_environ`` in one transaction with its inbox record, committed, then
    acked. The recipe runs after the ack, from a durable pending-run row.
    A result whose saved environ is gone (its job already resumed by another message, or
    deleted) is committed too, recorded as ``ignored``: upstream's "already resumed, ignoring".
``duplicate``
    Its key (message id, or body hash) is already in the inbox: acked with no second effect.
    The inbox decides this before the saved environ is looked at: a redelivery of a result
    already applied (whose saved environ it deleted) is a duplicate, never refused.
``dead-lettered``
    Message-specific and permanent: copied to the dead-letter queue with ``x-oioioi-*`` headers
    saying why (the reason, error class, message, time, delivery count, host), confirmed, then
    acked. Never requeued. The reasons: ``undecodable`` (not UTF-8 JSON, or JSON the decoder
    trips over, such as arrays nested past its recursion limit), ``invalid`` (not an environ a
    worker returns), ``rejected`` (refused by the domain: no ``job_id``, a ``saved_environ_id``
    that is not an integer), ``no-saved-environ`` (no ``saved_environ_id``: it would resume no
    job, and run as a new one), ``mismatch`` (its ``saved_environ_id`` is the saved environ of
    another job than its ``job_id``: both jobs are left waiting as they were; only the write can
    see this, so a batch holding one fails and is written one by one), ``delivery-limit`` and
    ``failed`` (below).
    The copy is confirmed before the original is acked, so a consumer that dies between the two
    (or loses the broker, or is stopped while the database is away, before the batch's ack)
    leaves a second copy in the dead-letter queue when the original comes back and is
    dead-lettered again; each copy has its own ``x-oioioi-dead-letter-id``. (A second copy in
    the retry queue is harmless: once one of them is committed, the other is a ``duplicate``.)
``retried``
    An unexpected exception from the write (a bug, a handler that raises): copied to the retry
    queue, which returns it to the results queue after ``retry_delay_ms``; confirmed, then acked.
    The attempt count travels in ``x-oioioi-retries``; past ``max_retries`` the message is
    dead-lettered with the traceback (reason ``failed``). Other messages are not held up
    meanwhile.
``held``
    Transient database errors (connection lost, server restarting, lock timeout, SQLite busy,
    serialization failure, a server that refuses writes during a failover) are first retried
    in-process (tenacity, exponential backoff with jitter, connections reset between attempts,
    heartbeats kept alive by the main thread). When the budget is spent the database is *away*,
    which is not the message's fault: the consumer keeps the message unacked, takes nothing new,
    probes the database with backoff and writes the same message again once it answers. No retry
    budget is spent and nothing is dead-lettered.
    (If the database answers its probe at once and yet the same write fails that way three
    rounds running, the error is the message's after all, e.g. a statement timeout it causes:
    it is ``retried``.)
``left unacked``
    On broker connection loss, a channel closure, a broker cancel, or a copy the broker did not
    confirm, unacked deliveries return to the queue by themselves; the consumer reconnects with
    backoff and never acks a tag from an earlier channel. A redelivery of something already
    committed is a ``duplicate``.
    SIGTERM/SIGINT while a message is ``held`` ends the holding: the consumer closes without
    acking anything of the batch in hand, whose messages all come back, those already committed
    as ``duplicate``, those already copied to the dead-letter or retry queue as a second copy.
``broker dead-lettered``
    A message that kills its consumer process again and again (so no outcome above is reached) is
    dead-lettered by the quorum queue's delivery limit, with the broker's ``x-death`` header.
    Classic queues have no such limit, so there the consumer keeps the count: before it writes a
    redelivered message it adds one to the message's attempt count in a transaction of its own,
    and past ``delivery_limit`` it dead-letters the message itself (reason ``delivery-limit``).
    If the count cannot be made, the message is written as if it were its first attempt: a lost
    count can cost another crash, never the message.

On the way to its outcome a decoded message is written one of two ways:

``written with its batch``
    A first delivery is written with the others of its batch, in one transaction; if that fails
    for any reason other than the database being away (or the broker being gone), each message of
    the batch is ``written alone``, so one bad message never takes others with it and the outcomes
    above hold per message.
``written alone``
    A redelivered message (a *suspect*: it may be what killed the previous consumer) is written in
    a transaction of its own, so that a crash is charged to it alone; so is each message of a
    batch that failed.

A fresh channel starts with a prefetch of one and raises it when a first-time delivery arrives: a
quorum queue counts a delivery against every message the dead consumer held, so the fewer innocent
messages are in flight beside a suspect, the fewer are charged for its crashes. (A consumer already
at full prefetch keeps it when another's redeliveries reach it; innocent messages then pay at most
one delivery for each crash they were in flight for, well within the default limit of 20.)

SIGTERM/SIGINT: take nothing new, finish and settle the batch in hand, close (while the database is
away, close at once, ``left unacked``). A second signal exits at once; whatever was in hand is
redelivered, which is a ``duplicate`` if it had committed.
"""

from __future__ import annotations

import enum
import socket
import traceback
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from consumer.config import Settings
from consumer.errors import (
    DatabaseUnavailable,
    PermanentError,
    ShuttingDown,
    TransportError,
)
from consumer.transport import Delivery, Properties

#: Rounds of "the write failed with transient errors, yet the database answered the probe at
#: once" after which the error is taken to be the message's.
ANSWERED_ROUNDS = 3


class Kind(enum.Enum):
    """What went wrong, as far as the policy cares; :func:`classify` names an error's kind."""

    #: Nothing: the message was decoded, its attempt counted, or its write answered.
    NONE = "none"
    #: The message can never succeed (a :class:`~consumer.errors.PermanentError`, with its reason).
    PERMANENT = "permanent"
    #: Any other exception: a bug, a handler that raises, a write that keeps failing although the
    #: database answers.
    UNEXPECTED = "unexpected"
    #: Transient database errors, past the in-process retries.
    DATABASE_AWAY = "database away"
    #: The broker connection or channel is gone, or a copy we published was not confirmed.
    BROKER_GONE = "broker gone"
    #: Shutdown was asked for while a message was held.
    STOPPING = "stopping"


class Stage(enum.Enum):
    """Where in a message's way the decision is taken."""

    #: Decoding and checking its body, before anything is written.
    DECODE = "decode"
    #: Classic queues: counting a redelivered message's attempt, in a transaction of its own.
    COUNT = "count"
    #: Writing it (with its batch, or alone).
    WRITE = "write"


class Outcome(enum.Enum):
    """What becomes of a message; each value is a term of this module's docstring."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead-lettered"
    RETRIED = "retried"
    HELD = "held"
    LEFT_UNACKED = "left unacked"
    #: On the way, not settled yet: write it with the rest of its batch.
    WRITE_WITH_BATCH = "written with its batch"
    #: On the way, not settled yet: write it in a transaction of its own.
    WRITE_ALONE = "written alone"


@dataclass(frozen=True)
class Facts:
    """What is known about a delivery when a decision is taken."""

    stage: Stage = Stage.WRITE
    #: Delivered before (the redelivered flag, or a delivery count over one): a suspect.
    redelivered: bool = False
    #: Classic queues: its attempts, this one included, as counted in the database (0: already
    #: applied); None where nothing was counted.
    attempts: int | None = None
    #: Times it has been through the retry queue (``x-oioioi-retries``).
    retries: int = 0
    #: Messages written in the same transaction, this one included.
    batch: int = 1
    #: Rounds running in which its write failed with transient errors although the database
    #: answered its probe at once.
    answered_rounds: int = 0
    #: The write's answer: its key was in the inbox already.
    duplicate: bool = False


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    #: Dead-lettered: the reason put in the headers; None for a permanent error's own reason.
    reason: str | None = None
    #: Dead-lettered: whether the headers carry the traceback (an error that is not the message's
    #: for sure, given up on).
    with_traceback: bool = False


def classify(error: BaseException, transient: tuple[type[BaseException], ...] = ()) -> Kind:
    """The kind of ``error``; ``transient``: the database errors that are worth retrying."""
    if isinstance(error, ShuttingDown):
        return Kind.STOPPING
    if isinstance(error, TransportError):
        return Kind.BROKER_GONE
    if isinstance(error, DatabaseUnavailable) or (transient and isinstance(error, transient)):
        return Kind.DATABASE_AWAY
    if isinstance(error, PermanentError):
        return Kind.PERMANENT
    return Kind.UNEXPECTED


def decide(kind: Kind, facts: Facts, settings: Settings) -> Decision:
    """The policy: what becomes of a message, given what went wrong and what is known of it."""
    if kind in (Kind.BROKER_GONE, Kind.STOPPING):
        return Decision(Outcome.LEFT_UNACKED)
    if facts.stage is Stage.DECODE:
        if kind is Kind.NONE:
            return Decision(Outcome.WRITE_ALONE if facts.redelivered else Outcome.WRITE_WITH_BATCH)
        if kind is Kind.PERMANENT:
            return Decision(Outcome.DEAD_LETTERED)
        # The decoder tripped over the body itself: still the message's fault.
        return Decision(Outcome.DEAD_LETTERED, "undecodable")
    if kind is Kind.DATABASE_AWAY and facts.answered_rounds < ANSWERED_ROUNDS:
        return Decision(Outcome.HELD)
    if facts.stage is Stage.COUNT:
        if kind is Kind.NONE and (facts.attempts or 0) > settings.delivery_limit:
            return Decision(Outcome.DEAD_LETTERED, "delivery-limit")
        # Counted, or the count could not be made: a lost count can cost another crash, never
        # the message.
        return Decision(Outcome.WRITE_ALONE)
    if kind is Kind.NONE:
        return Decision(Outcome.DUPLICATE if facts.duplicate else Outcome.COMMITTED)
    if facts.batch > 1:
        return Decision(Outcome.WRITE_ALONE)
    if kind is Kind.PERMANENT:
        return Decision(Outcome.DEAD_LETTERED)
    if facts.retries >= settings.max_retries:
        return Decision(Outcome.DEAD_LETTERED, "failed", with_traceback=True)
    return Decision(Outcome.RETRIED)


def facts(delivery: Delivery, stage: Stage = Stage.WRITE, **known: Any) -> Facts:
    """The facts of ``delivery`` its headers tell, with ``known`` (see :class:`Facts`)."""
    return Facts(stage=stage, redelivered=suspect(delivery), retries=retries(delivery), **known)


#: Header prefix of everything this project adds to a message.
PREFIX = "x-oioioi-"
RETRIES = PREFIX + "retries"
REASON = PREFIX + "reason"
DEAD_LETTER_ID = PREFIX + "dead-letter-id"

_HOST = socket.gethostname()

#: Longest error text kept in a header (a traceback of a deep recursion can be huge).
_MAX_TEXT = 8 * 1024


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def retries(delivery: Delivery) -> int:
    value = delivery.properties.headers.get(RETRIES, 0)
    return value if isinstance(value, int) else 0


def suspect(delivery: Delivery) -> bool:
    """Delivered before: it may be the message that killed an earlier consumer."""
    return delivery.redelivered or delivery_count(delivery) > 1


def delivery_count(delivery: Delivery) -> int:
    """Deliveries so far, including this one: the quorum queue's count, else what we know."""
    counted = delivery.properties.headers.get("x-delivery-count")
    if isinstance(counted, int):
        return counted + 1
    return 2 if delivery.redelivered else 1


def _error_headers(error: BaseException, *, with_traceback: bool) -> dict[str, Any]:
    headers: dict[str, Any] = {
        PREFIX + "error-class": f"{type(error).__module__}.{type(error).__qualname__}",
        PREFIX + "error": _clip(str(error) or repr(error)),
        PREFIX + "host": _HOST,
        PREFIX + "failed-at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if with_traceback:
        headers[PREFIX + "traceback"] = _clip(
            "".join(traceback.format_exception(type(error), error, error.__traceback__))
        )
    return headers


def reason_of(error: BaseException) -> str:
    return getattr(error, "reason", "failed")


def dead_letter_properties(
    delivery: Delivery,
    error: BaseException,
    queue: str,
    *,
    reason: str | None = None,
    with_traceback: bool = False,
) -> Properties:
    """The copy's properties: the original's, with headers saying why (``reason``, else the
    error's own)."""
    headers = dict(delivery.properties.headers)
    headers.update(_error_headers(error, with_traceback=with_traceback))
    headers[REASON] = reason or reason_of(error)
    # A stable handle for operators: message ids may be missing or repeated in the dead letters.
    headers[DEAD_LETTER_ID] = uuid.uuid4().hex
    headers[PREFIX + "delivery-count"] = delivery_count(delivery)
    headers[PREFIX + "retries"] = retries(delivery)
    headers[PREFIX + "original-queue"] = queue
    return _with_headers(delivery.properties, headers)


def retry_properties(delivery: Delivery, error: BaseException) -> Properties:
    headers = dict(delivery.properties.headers)
    headers.update(_error_headers(error, with_traceback=False))
    headers[RETRIES] = retries(delivery) + 1
    return _with_headers(delivery.properties, headers)


def _with_headers(props: Properties, headers: dict[str, Any]) -> Properties:
    return Properties(
        message_id=props.message_id,
        headers=headers,
        timestamp=props.timestamp,
        content_type=props.content_type,
        app_id=props.app_id,
        correlation_id=props.correlation_id,
    )
