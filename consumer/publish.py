"""Putting a finished environ on the results exchange: the whole contract for a worker.

The body is the environ as UTF-8 JSON, persistent, mandatory, with publisher confirms; its
``message_id`` is the environ's ``group_id`` when it has one (the consumer's idempotency key).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from consumer.config import Settings
from consumer.errors import ConnectionClosed, PublishError, TransportError
from consumer.retry import Backoff
from consumer.transport import Properties, Transport

log = logging.getLogger(__name__)


def encode(env: dict[str, Any] | bytes | str) -> bytes:
    if isinstance(env, bytes):
        return env
    if isinstance(env, str):
        return env.encode("utf-8")
    return json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def message_properties(env: dict[str, Any] | None, message_id: str | None = None) -> Properties:
    if message_id is None and env is not None and isinstance(env.get("group_id"), str):
        message_id = env["group_id"]
    return Properties(
        message_id=message_id,
        timestamp=int(time.time()),
        content_type="application/json",
        app_id="oioioi-results",
    )


class Publisher:
    """A reusable confirmed publisher; reconnects on the next publish after a connection loss."""

    def __init__(self, settings: Settings, *, attempts: int = 5, backoff_max: float = 5.0) -> None:
        self.settings = settings
        self.attempts = attempts
        self.backoff_max = backoff_max
        self._transport: Transport | None = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def publish_once(self, body: bytes, properties: Properties) -> None:
        """One attempt; raises :class:`PublishError` or :class:`TransportError`."""
        if self._transport is None or not self._transport.is_open:
            self.close()
            self._transport = Transport(self.settings, consume=False)
        try:
            self._transport.publish(
                self.settings.exchange, self.settings.routing_key, body, properties
            )
        except TransportError:
            self.close()
            raise

    def publish(self, env: dict[str, Any] | bytes | str, *, message_id: str | None = None) -> None:
        """Publish with confirms, retrying a bounded number of times; raises on final failure."""
        body = encode(env)
        parsed = env if isinstance(env, dict) else None
        properties = message_properties(parsed, message_id)
        backoff = Backoff(0.2, self.backoff_max)
        for attempt in range(1, self.attempts + 1):
            try:
                self.publish_once(body, properties)
                return
            except (PublishError, ConnectionClosed) as e:
                if attempt == self.attempts:
                    raise
                delay = backoff.next()
                log.warning(
                    "Publish attempt %d failed (%s); retrying in %.1f s.", attempt, e, delay
                )
                time.sleep(delay)


def publish(
    env: dict[str, Any] | bytes | str, settings: Settings | None = None, **kwargs: Any
) -> None:
    """Publish one environ on a short-lived connection (declaring the topology if needed)."""
    with Publisher(settings or Settings()) as publisher:
        publisher.publish(env, **kwargs)
