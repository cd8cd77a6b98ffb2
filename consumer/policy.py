"""Failure policy: the one known outcome of every message.

Every delivery ends in exactly one of these, and is acknowledged only after that outcome is durable
(the database commit, or the broker's confirm of the copy we published):

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
    acked. Never requeued. The reasons: ``undecodable`` (not UTF-8 JSON), ``invalid`` (not an
    environ a worker returns), ``rejected`` (refused by the domain: no ``job_id``, a
    ``saved_environ_id`` that is not an integer), ``no-saved-environ`` (no ``saved_environ_id``:
    it would resume no job, and run as a new one), ``mismatch`` (its ``saved_environ_id`` is the
    saved environ of another job than its ``job_id``: both jobs are left waiting as they were;
    only the write can see this, so a batch holding one fails and is written one by one),
    ``delivery-limit`` and ``failed`` (below).
``retried later``
    An unexpected exception from the write (a bug, a handler that raises): copied to the retry
    queue, which returns it to the results queue after ``retry_delay_ms``; confirmed, then acked.
    The attempt count travels in ``x-oioioi-retries``; past ``max_retries`` the message is
    dead-lettered with the traceback. Other messages are not held up meanwhile.
``left unacked``
    Transient database errors (connection lost, server restarting, lock timeout, SQLite busy,
    serialization failure, a server that refuses writes during a failover) are first retried
    in-process (tenacity, exponential backoff with
    jitter, connections reset between attempts, heartbeats kept alive by the main thread). When the
    budget is spent the database is *away*, which is not the message's fault: the consumer keeps the
    message unacked, takes nothing new, probes the database with backoff and writes the same
    message again once it answers. No retry budget is spent and nothing is dead-lettered.
    (If the database answers its probe at once and yet the same write fails that way three
    rounds running, the error is the message's after all, e.g. a statement timeout it causes:
    it is ``retried later``.)
    On broker connection loss, a channel closure or a broker cancel, unacked deliveries return to
    the queue by themselves; the consumer reconnects with backoff and never acks a tag from an
    earlier channel. A redelivery of something already committed is a ``duplicate``.
``broker dead-lettered``
    A message that kills its consumer process again and again (so no outcome above is reached) is
    dead-lettered by the quorum queue's delivery limit, with the broker's ``x-death`` header.
    Classic queues have no such limit, so there the consumer keeps the count: before it writes a
    redelivered message it adds one to the message's attempt count in a transaction of its own,
    and past ``delivery_limit`` it dead-letters the message itself (reason ``delivery-limit``).

A redelivered message (a *suspect*: it may be what killed the previous consumer) is written in a
transaction of its own, so that a crash is charged to it alone. A fresh channel starts with a
prefetch of one and raises it when a first-time delivery arrives: a quorum queue counts a delivery
against every message the dead consumer held, so the fewer innocent messages are in flight beside
a suspect, the fewer are charged for its crashes. (A consumer already at full prefetch keeps it
when another's redeliveries reach it; innocent messages then pay at most one delivery for each
crash they were in flight for, well within the default limit of 20.)

A batch is written in one transaction; if it fails for any reason other than the database being
away, each of its messages is written again on its own, so one bad message never takes others with
it and the outcomes above hold per message.

SIGTERM/SIGINT: take nothing new, finish and settle the batch in hand, close. A second signal
exits at once; whatever was in hand is redelivered, which is a ``duplicate`` if it had committed.
"""

from __future__ import annotations

import socket
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

from consumer.transport import Delivery, Properties

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
    delivery: Delivery, error: BaseException, queue: str, *, with_traceback: bool = False
) -> Properties:
    headers = dict(delivery.properties.headers)
    headers.update(_error_headers(error, with_traceback=with_traceback))
    headers[REASON] = reason_of(error)
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
