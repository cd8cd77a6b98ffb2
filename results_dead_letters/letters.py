"""One dead letter as an operator sees it: read from a message's properties and body, and the
properties a replayed copy carries. Pure: no broker, no database.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from consumer.policy import DEAD_LETTER_ID, PREFIX, REASON
from consumer.transport import PERSISTENT, PROPERTY_NAMES, AmqpProperties

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


def from_message(properties: AmqpProperties | None, body: bytes) -> DeadLetter:
    """Read a dead letter from its AMQP properties (anything with their attributes, pika's
    included) and body; never raises on odd input."""
    props = properties or AmqpProperties()
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



def properties_dict(properties: AmqpProperties | None) -> dict[str, Any]:
    """A message's properties as JSON-serialisable values (header values as :func:`jsonable`):
    what is kept with an archived dead letter."""
    props = properties or AmqpProperties()
    out: dict[str, Any] = {}
    for name in PROPERTY_NAMES:
        value = getattr(props, name, None)
        if value is not None:
            out[name] = jsonable(value)
    return out


def properties_from_dict(values: dict[str, Any]) -> AmqpProperties:
    """The inverse of :func:`properties_dict` (header values keep their JSON types)."""
    return AmqpProperties(**{k: v for k, v in values.items() if k in PROPERTY_NAMES})


def replay_properties(properties: AmqpProperties | None) -> AmqpProperties:
    """The properties of a replayed copy: the original's, without the failure's traces."""
    props = properties or AmqpProperties()
    headers: dict[str, Any] = {}
    for key, value in (props.headers or {}).items():
        if key.startswith(PREFIX) or key in _BROKER_HEADERS:
            continue
        if key.startswith(_BROKER_HEADER_PREFIXES):
            continue
        headers[key] = value
    # Dropping x-oioioi-retries also gives the replay a fresh retry budget.
    headers[REPLAYS] = (_int((props.headers or {}).get(REPLAYS)) or 0) + 1
    return AmqpProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers,
        delivery_mode=PERSISTENT,
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

