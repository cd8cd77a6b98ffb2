"""The dead-letter queue, for operators: move it into an archive, see it, replay it, discard it.

:func:`archive` moves dead letters into a store the caller gives (the Django side's database
table), committed first, acked after; :class:`Republisher` sends archived ones back. The operator
pages and commands work on that archive. The functions below them work on the queue itself:

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
import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from consumer import diagnose, topology
from consumer.config import Settings
from consumer.errors import ConnectionClosed, ConsumerError, PublishError
from consumer.policy import DEAD_LETTER_ID, PREFIX, REASON
from consumer.transport import CONNECTION_ERRORS, connect, within

log = logging.getLogger(__name__)

#: How many times a message was sent back to the results queue by an operator. It is the one
#: ``x-oioioi-*`` header a replay keeps (and counts up).
REPLAYS = PREFIX + "replays"

#: Headers the broker adds while dead-lettering and delivering. A replay drops them: above all
#: ``x-death``, because the broker silently drops a message dead-lettered into a queue that its
#: ``x-death`` already names unless a reject came in between, and the retry queue dead-letters
#: into the results queue. A replayed message that had once hit the delivery limit, and then
#: failed once more, would vanish in the retry queue.
_BROKER_HEADERS = ("x-death", "x-delivery-count")
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")

#: Longest body parsed for the job and group ids (a bigger one is shown without them).
_MAX_PARSED_BODY = 16 * 1024 * 1024

Progress = Callable[[int, int], None]


def _must_exist(channel: BlockingChannel, kind: str, name: str, what: str) -> Any:
    """A passive declare of the queue or exchange ``name`` (nothing is created: a wrong name must
    not look like an empty queue); :class:`TopologyMissing` if the broker has none. The channel
    is closed by a refusal."""
    declare = channel.queue_declare if kind == "queue" else channel.exchange_declare
    try:
        return declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            raise TopologyMissing(f"{what} {name!r} does not exist on the broker") from None
        raise


class TopologyMissing(ConsumerError):
    """Raised when the dead-letter queue or the results exchange does not exist on the broker."""

    failure_kind = diagnose.MISSING


class BrokerRefused(ConsumerError):
    """Raised when the broker closed the channel on us (no permission, a queue deleted meanwhile)."""

    #: The broker's reply code (403: access refused), when it gave one.
    reply_code: int | None = None

    @property
    def failure_kind(self) -> str:
        return diagnose.ACCESS_REFUSED if self.reply_code == 403 else diagnose.REFUSED


class TopologyMismatch(ConsumerError):
    """Raised when the dead-letter queue exists with other arguments (type) than configured."""


# --- one dead letter -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter queue, as an operator sees it."""

    #: The ``x-oioioi-dead-letter-id`` header, or (for a message the broker dead-lettered) a
    #: hash of the body and the dead-lettering headers: the same message has the same id on
    #: every pass. Copies of one message (see the module docstring) share it.
    id: str
    message_id: str | None
    #: Why: the consumer's reason code, or the broker's (``delivery-limit``, ``expired``, ...).
    reason: str
    error: str | None
    error_class: str | None
    traceback: str | None
    failed_at: datetime | None
    delivery_count: int | None
    retries: int | None
    host: str | None
    job_id: str | None
    group_id: str | None
    submission_id: int | None
    size: int
    headers: dict[str, Any]
    body: bytes
    content_type: str | None
    timestamp: int | None
    #: The AMQP properties, JSON-serialisable (:func:`properties_dict`): what a replay sends again.
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def replays(self) -> int:
        """How many times an operator has replayed it before (``x-oioioi-replays``)."""
        return _int(self.headers.get(REPLAYS)) or 0

    def age_seconds(self, now: float | None = None) -> float | None:
        """Seconds since it failed (or, lacking that, since it was published)."""
        if self.failed_at is not None:
            then = self.failed_at.timestamp()
        elif self.timestamp is not None:
            then = float(self.timestamp)
        else:
            return None
        return max(0.0, (time.time() if now is None else now) - then)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Everything but the body and the headers, JSON-serialisable."""
        return {
            "id": self.id,
            "message_id": self.message_id,
            "reason": self.reason,
            "error": self.error,
            "error_class": self.error_class,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "age_seconds": self.age_seconds(now),
            "delivery_count": self.delivery_count,
            "retries": self.retries,
            "host": self.host,
            "job_id": self.job_id,
            "group_id": self.group_id,
            "submission_id": self.submission_id,
            "size": self.size,
            "content_type": self.content_type,
            "timestamp": self.timestamp,
        }


def jsonable(value: Any) -> Any:
    """Header values (datetimes, bytes, nested tables) in a form ``json.dumps`` accepts."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if value is None:
        return None
    return str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _deaths(headers: dict[str, Any]) -> list[dict[str, Any]]:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return []
    return [d for d in deaths if isinstance(d, dict)]


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _body_fields(body: bytes) -> tuple[str | None, str | None, int | None]:
    """Job id, group id and submission id from a JSON body; nothing if it is not one."""
    if len(body) > _MAX_PARSED_BODY:
        return None, None, None
    try:
        env = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, None
    if not isinstance(env, dict):
        return None, None, None
    job_id, group_id = env.get("job_id"), env.get("group_id")
    return (
        job_id if isinstance(job_id, str) else None,
        group_id if isinstance(group_id, str) else None,
        _int(env.get("submission_id")),
    )


def _derived_id(body: bytes, message_id: str | None, timestamp: int | None, headers: dict) -> str:
    # Only what never changes while the message sits in the queue: not x-delivery-count.
    stable = {
        "message_id": message_id,
        "timestamp": timestamp,
        "x-death": jsonable(headers.get("x-death")),
        **{k: jsonable(v) for k, v in headers.items() if k.startswith(_BROKER_HEADER_PREFIXES)},
    }
    digest = hashlib.sha256(body)
    digest.update(json.dumps(stable, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def from_message(properties: pika.BasicProperties | None, body: bytes) -> DeadLetter:
    """Read a dead letter from its AMQP properties and body; never raises on odd input."""
    props = properties or pika.BasicProperties()
    headers: dict[str, Any] = dict(props.headers or {})
    message_id = _text(props.message_id) or None
    timestamp = _int(props.timestamp)
    deaths = _deaths(headers)
    own_reason = _text(headers.get(REASON))
    if own_reason:
        reason = own_reason
        failed_at = _parse_time(headers.get(PREFIX + "failed-at"))
    elif deaths:
        # The broker's codes (delivery_limit, expired, rejected, maxlen), in our spelling.
        reason = (_text(deaths[0].get("reason")) or "unknown").replace("_", "-")
        failed_at = _parse_time(deaths[0].get("time")) or _parse_time(
            headers.get(PREFIX + "failed-at")
        )
    else:
        reason = "unknown"
        failed_at = _parse_time(headers.get(PREFIX + "failed-at"))
    job_id, group_id, submission_id = _body_fields(body)
    return DeadLetter(
        id=_text(headers.get(DEAD_LETTER_ID)) or _derived_id(body, message_id, timestamp, headers),
        message_id=message_id,
        reason=reason,
        error=_text(headers.get(PREFIX + "error")),
        error_class=_text(headers.get(PREFIX + "error-class")),
        traceback=_text(headers.get(PREFIX + "traceback")),
        failed_at=failed_at,
        delivery_count=_int(headers.get(PREFIX + "delivery-count")),
        retries=_int(headers.get(PREFIX + "retries")),
        host=_text(headers.get(PREFIX + "host")),
        job_id=job_id,
        group_id=group_id,
        submission_id=submission_id,
        size=len(body),
        headers=headers,
        body=body,
        content_type=_text(props.content_type),
        timestamp=timestamp,
        properties=properties_dict(props),
    )


#: The AMQP properties kept with an archived dead letter, in ``pika.BasicProperties``' names.
_PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def properties_dict(properties: pika.BasicProperties | None) -> dict[str, Any]:
    """A message's properties as JSON-serialisable values (header values as :func:`jsonable`)."""
    props = properties or pika.BasicProperties()
    out: dict[str, Any] = {}
    for name in _PROPERTY_NAMES:
        value = getattr(props, name, None)
        if value is not None:
            out[name] = jsonable(value)
    return out


def properties_from_dict(values: dict[str, Any]) -> pika.BasicProperties:
    """The inverse of :func:`properties_dict` (header values keep their JSON types)."""
    return pika.BasicProperties(**{k: v for k, v in values.items() if k in _PROPERTY_NAMES})


def replay_properties(properties: pika.BasicProperties | None) -> pika.BasicProperties:
    """The properties of a replayed copy: the original's, without the failure's traces."""
    props = properties or pika.BasicProperties()
    headers: dict[str, Any] = {}
    for key, value in (props.headers or {}).items():
        if key.startswith(PREFIX) or key in _BROKER_HEADERS:
            continue
        if key.startswith(_BROKER_HEADER_PREFIXES):
            continue
        headers[key] = value
    # Dropping x-oioioi-retries also gives the replay a fresh retry budget.
    headers[REPLAYS] = (_int((props.headers or {}).get(REPLAYS)) or 0) + 1
    return pika.BasicProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers,
        delivery_mode=pika.DeliveryMode.Persistent,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        message_id=props.message_id,
        timestamp=props.timestamp,
        type=props.type,
        # Not user_id: the broker refuses a publish whose user_id is not the publisher's login.
        app_id=props.app_id,
        cluster_id=props.cluster_id,
    )


# --- the pass over the queue -----------------------------------------------------------------------


@contextlib.contextmanager
def _wrapped(what: str) -> Iterator[None]:
    try:
        yield
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
        raise PublishError(f"{what}: the broker did not accept the message: {e!r}") from None
    except pika.exceptions.ChannelClosedByBroker as e:
        refused = BrokerRefused(f"{what}: the broker refused ({e.reply_code} {e.reply_text})")
        refused.reply_code = e.reply_code
        raise refused from None
    except CONNECTION_ERRORS as e:
        raise ConnectionClosed(f"{what}: broker connection lost: {e!r}") from None


class _Message:
    """A message taken from the queue and not yet settled."""

    def __init__(self, tag: int, properties: pika.BasicProperties, body: bytes) -> None:
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
        self._connection: BlockingConnection = connect(settings, name="oioioi-deadletters")[0]
        try:
            self._channel = self._open_checked_channel()
        except BaseException:
            self.close()
            raise

    def _open_checked_channel(self) -> BlockingChannel:
        with _wrapped("checking the dead-letter queue"):
            # A passive declare that fails closes its channel, so it gets one of its own; and
            # nothing is created here: a wrong queue name must not look like an empty queue.
            probe = self._connection.channel()
            _must_exist(probe, "queue", self.queue, "the dead-letter queue")
            with contextlib.suppress(pika.exceptions.AMQPError):
                probe.close()
            channel = self._connection.channel()
            try:
                # Declared again with its arguments: the broker refuses if the queue's type is
                # not the configured one, and the way kept messages are put back depends on it.
                # (Not where the broker's definitions hold the topology and we may not declare.)
                if self.settings.declare_topology:
                    channel.queue_declare(
                        self.queue,
                        durable=True,
                        arguments=topology.dead_letter_queue_arguments(self.settings),
                    )
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 406:
                    raise TopologyMismatch(
                        f"the dead-letter queue {self.queue!r} is not a "
                        f"{self.settings.queue_type} queue as configured: {e.reply_text}"
                    ) from None
                raise
            channel.confirm_delivery()
            return channel

    def check_results_exchange(self) -> None:
        with _wrapped("checking the results exchange"):
            probe = self._connection.channel()
            _must_exist(probe, "exchange", self.settings.exchange, "the results exchange")
            with contextlib.suppress(pika.exceptions.AMQPError):
                probe.close()

    def depth(self) -> int:
        with _wrapped("counting the dead-letter queue"):
            return int(self._channel.queue_declare(self.queue, passive=True).method.message_count)

    def take(self) -> _Message | None:
        with _wrapped("reading the dead-letter queue"):
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=False)
        if method is None:
            return None
        return _Message(method.delivery_tag, properties, body)

    def drop(self, message: _Message) -> None:
        with _wrapped("acknowledging a dead letter"):
            self._channel.basic_ack(message.tag)
        message.settled = True

    def replay(self, message: _Message) -> None:
        """Republish to the results exchange, then ack; raises :class:`PublishError` if refused.

        A refusal (unroutable, nacked) leaves the message unsettled and the channel usable.
        """
        with _wrapped("replaying"):
            self._channel.basic_publish(
                self.settings.exchange,
                self.settings.routing_key,
                message.body,
                replay_properties(message.properties),
                mandatory=True,
            )
        self.drop(message)

    def keep(self, message: _Message) -> None:
        if self.requeues:
            # Held until the pass ends; requeued then, a classic queue puts it back in its place.
            self._held.append(message.tag)
        else:
            with _wrapped("keeping a dead letter"):
                self._channel.basic_publish(
                    "", self.queue, message.body, message.properties, mandatory=True
                )
            self.drop(message)
        message.settled = True

    def is_usable(self) -> bool:
        return bool(self._connection.is_open and self._channel.is_open)

    def purge(self) -> int:
        with _wrapped("purging the dead-letter queue"):
            return int(self._channel.queue_purge(self.queue).method.message_count)

    def finish(self) -> None:
        if not self._held:
            return
        held = len(self._held)
        with _wrapped("putting kept dead letters back"):
            others = self.depth()
            self._channel.basic_nack(self._held[-1], multiple=True, requeue=True)
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
        try:
            if self._connection.is_open:
                self._connection.close()
        except Exception:
            log.debug("Error while closing the dead-letter connection.", exc_info=True)


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


def find(settings: Settings, ids: Collection[str]) -> list[DeadLetter]:
    """The dead letters with these ids, in queue order, in one pass; the queue is unchanged."""
    wanted = set(ids)
    found: list[DeadLetter] = []

    def visit(dlq: _Pass, message: _Message) -> bool:
        letter = from_message(message.properties, message.body)
        if letter.id in wanted:
            found.append(letter)
        return _CONTINUE

    if wanted:
        _run_pass(settings, visit)
    return found


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


# --- moving dead letters into an archive, and sending archived ones back ---------------------------

#: Stores dead letters durably; returns only once they are committed (raises if they are not).
ArchiveStore = Callable[[list[DeadLetter]], None]

Tune = Callable[[pika.URLParameters], None]


def archive(
    settings: Settings,
    store: ArchiveStore,
    *,
    limit: int | None = None,
    batch: int = 500,
    tune: Tune | None = None,
    timeout: float | None = None,
) -> int:
    """Move dead letters from the queue into ``store``: each batch is committed, then acked.

    Taken from the queue's head, up to ``batch`` at a time, at most ``limit`` in all (the whole
    queue by default). A batch is acked, with one ``multiple`` ack, only after ``store`` has
    returned; if ``store`` raises, or the process dies first, the connection closes and the
    broker puts the batch back, so a dead letter is always in the queue, in the store, or (after
    a crash between commit and ack, or an ack the broker lost) in both, in which case the store
    must ignore the second copy (same :attr:`DeadLetter.id`), even after the first was replayed. ``timeout`` bounds each broker call. Returns how many moved.
    """
    if limit is not None and limit <= 0:
        return 0
    connection = connect(settings, name="oioioi-deadletter-archiver", tune=tune)[0]
    moved = 0
    try:
        with _wrapped("archiving the dead-letter queue"):
            with within(connection, timeout):
                channel = connection.channel()
                _must_exist(channel, "queue", settings.dead_letter_queue, "the dead-letter queue")
            pending: list[DeadLetter] = []
            last_tag = 0
            while True:
                # Each ack is followed by a get: the broker has applied an ack once it answers a
                # later get on the same channel. A quorum queue (RabbitMQ 3.10, measured) hands
                # out again messages whose ack was still on its way when the connection closed.
                full = limit is not None and moved + len(pending) >= limit
                if len(pending) >= batch or full:
                    store(pending)
                    with within(connection, timeout):
                        channel.basic_ack(last_tag, multiple=True)
                    moved += len(pending)
                    pending = []
                    if full:
                        # The get that settles the ack; a message it takes goes back when the
                        # connection closes (and is archived next time).
                        with within(connection, timeout):
                            channel.basic_get(settings.dead_letter_queue, auto_ack=False)
                        break
                with within(connection, timeout):
                    method, properties, body = channel.basic_get(
                        settings.dead_letter_queue, auto_ack=False
                    )
                if method is None:
                    if pending:
                        store(pending)
                        with within(connection, timeout):
                            channel.basic_ack(last_tag, multiple=True)
                        moved += len(pending)
                        pending = []
                        continue  # the get that settles the ack
                    break
                pending.append(from_message(properties, body))
                last_tag = method.delivery_tag
    finally:
        try:
            if connection.is_open:
                connection.close()
        except Exception:
            log.debug("Error while closing the archiver's connection.", exc_info=True)
    if moved:
        log.info(
            "Archived %d dead letter(s) from %r.",
            moved,
            settings.dead_letter_queue,
            extra={"outcome": "archived", "count": moved},
        )
    return moved


class Republisher:
    """Sends dead letters kept elsewhere (an archive) back to the results exchange, confirmed.

    One connection, opened with ``tune`` (shorter timeouts); every broker call is bounded by
    ``timeout``. Use as a context manager.
    """

    def __init__(
        self, settings: Settings, *, tune: Tune | None = None, timeout: float | None = None
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self._connection = connect(settings, name="oioioi-deadletter-replay", tune=tune)[0]
        try:
            with _wrapped("checking the results exchange"), within(self._connection, timeout):
                probe = self._connection.channel()
                _must_exist(probe, "exchange", settings.exchange, "the results exchange")
                self._channel = self._connection.channel()
                self._channel.confirm_delivery()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Republisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_usable(self) -> bool:
        return bool(self._connection.is_open and self._channel.is_open)

    def replay(self, body: bytes, properties: dict[str, Any]) -> None:
        """Publish one copy (see :func:`replay_properties`) and wait for the broker's confirm.

        Raises :class:`PublishError` when the broker refuses it (unroutable, nacked: the
        connection stays usable), :class:`ConnectionClosed` when the connection is lost or the
        confirm does not come within ``timeout``.
        """
        with _wrapped("replaying"), within(self._connection, self.timeout):
            self._channel.basic_publish(
                self.settings.exchange,
                self.settings.routing_key,
                body,
                replay_properties(properties_from_dict(properties)),
                mandatory=True,
            )

    def close(self) -> None:
        try:
            if self._connection.is_open:
                self._connection.close()
        except Exception:
            log.debug("Error while closing the replay connection.", exc_info=True)


def queue_depth(
    settings: Settings, *, tune: Tune | None = None, timeout: float | None = None
) -> int:
    """How many dead letters wait in the queue (ready ones), asked with bounded calls."""
    connection = connect(settings, name="oioioi-deadletters", tune=tune)[0]
    try:
        with _wrapped("counting the dead-letter queue"), within(connection, timeout):
            channel = connection.channel()
            ok = _must_exist(channel, "queue", settings.dead_letter_queue, "the dead-letter queue")
            return int(ok.method.message_count)
    finally:
        try:
            if connection.is_open:
                connection.close()
        except Exception:
            log.debug("Error while closing the dead-letter connection.", exc_info=True)
