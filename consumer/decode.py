"""From an AMQP body to an environ, by the legacy receiver's rules (without its ``assert``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from consumer import environ
from consumer.errors import InvalidEnviron, PermanentError, UndecodableMessage

#: Fields the legacy receiver deleted before resuming: the job group as sent, and its arguments.
DROPPED_FIELDS = ("workers_jobs", "workers_jobs.extra_args")


@dataclass(frozen=True)
class Result:
    """A decoded result, ready for the write."""

    #: The environ: a :class:`~consumer.environ.RawEnviron` (fields decoded when read), or a
    #: dict for the rare body only ``json.loads`` takes (``NaN``, unpaired surrogates).
    env: MutableMapping[str, Any]
    #: Idempotency key: the message id, or a hash of the body when the message has none.
    key: str
    message_id: str | None

    @property
    def job_id(self) -> str | None:
        value = self.env.get("job_id")
        return value if isinstance(value, str) else None

    @property
    def group_id(self) -> str | None:
        value = self.env.get("group_id")
        return value if isinstance(value, str) else None


def content_key(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def parse_environ(body: bytes | str) -> MutableMapping[str, Any]:
    """Parse a body into a JSON object, or raise :class:`UndecodableMessage`/:class:`InvalidEnviron`.

    The object's fields are decoded only when read (see :mod:`consumer.environ`).
    """
    try:
        env = environ.parse(body)
    except UnicodeDecodeError as e:
        raise UndecodableMessage(f"body is not UTF-8: {e}") from None
    except ValueError as e:
        raise UndecodableMessage(f"body is not JSON: {e}") from None
    if not isinstance(env, MutableMapping):
        raise InvalidEnviron(f"environ must be a JSON object, not {type(env).__name__}")
    return env


def validate(env: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Apply the legacy receiver's rules in place: drop the sent jobs, require results or error."""
    for field in DROPPED_FIELDS:
        # Deleted, not popped: a RawEnviron would decode what is thrown away.
        if field in env:
            del env[field]
    if "workers_jobs.results" not in env and "error" not in env:
        raise InvalidEnviron("environ has neither 'workers_jobs.results' nor 'error'")
    return env


def decode(
    body: bytes,
    message_id: str | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> Result:
    """Decode and validate one message body, and ``check`` its environ (the store's refusals).

    Raises only :class:`~consumer.errors.PermanentError`: a decoder that trips over the body
    (JSON nested past the recursion limit, read here or by ``check``) is the body's fault too,
    :class:`UndecodableMessage`.
    """
    try:
        env = validate(parse_environ(body))
        result = Result(env=env, key=message_id or content_key(body), message_id=message_id)
        if check is not None:
            check(result.env)
    except PermanentError:
        raise
    except Exception as e:
        raise UndecodableMessage(f"body could not be decoded: {type(e).__name__}: {e}") from None
    return result
