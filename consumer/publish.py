"""Putting a finished environ on the results exchange: the whole contract for a worker.

The body is the environ as UTF-8 JSON, persistent, mandatory, with publisher confirms; its
``message_id`` is the environ's ``group_id`` when it has one (the consumer's idempotency key).
A publish returns only once the broker has confirmed the message, so a caller that gets no
exception may forget the result: it is on a durable queue.

::

    from consumer.config import Settings
    from consumer.publish import Publisher, publish

    publish(env, Settings(amqp_url="amqp://user:pass@broker/%2F"))   # one-off: connect, publish, close
    with Publisher(settings) as publisher:                            # many: one connection, reused
        publisher.publish(env)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from consumer.config import Settings
from consumer.errors import PublishError, TransportError
from consumer.retry import Backoff
from consumer.transport import Properties, Transport

log = logging.getLogger(__name__)

Environ = dict[str, Any] | bytes | str

#: ``app_id`` of messages published through this module, unless the caller names another.
APP_ID = "oioioi-results"


def encode(env: Environ) -> bytes:
    """The message body: bytes as given, text as UTF-8, a dict as compact UTF-8 JSON."""
    if isinstance(env, bytes):
        return env
    if isinstance(env, str):
        return env.encode("utf-8")
    return json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def group_id_of(env: Environ) -> str | None:
    """The environ's ``group_id``, parsing a bytes or text body; None when there is none."""
    parsed: Any = env
    if not isinstance(env, dict):
        # By the standard library: sioworkersd's plugin publishes through this module, and its
        # environment has none of the consumer's faster JSON parser.
        try:
            parsed = json.loads(env)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            # Not a JSON object: it is published all the same (the consumer dead-letters it,
            # where an operator sees it) and identified by the hash of its body.
            return None
    value = parsed.get("group_id")
    return value if isinstance(value, str) and value else None


def message_properties(
    env: Environ, message_id: str | None = None, app_id: str = APP_ID
) -> Properties:
    return Properties(
        message_id=message_id if message_id is not None else group_id_of(env),
        timestamp=int(time.time()),
        content_type="application/json",
        app_id=app_id,
    )


class Publisher:
    """A confirmed publisher on one reused connection, reconnecting after a loss.

    Each message is tried until the broker confirms it, for at most ``timeout`` seconds in all
    (``settings.publish_timeout`` unless given: 30 s, longer than a cluster's election of a new
    queue leader): connecting to the first node that answers, publishing, waiting for the
    confirm, and after a failure (no node answers, a connection lost, a nack, no confirm in
    time) again on a fresh connection, with exponential backoff. ``attempts`` may bound the
    number of tries as well.

    Not thread-safe (neither is a pika connection): give each thread a publisher of its own.
    Each connection declares the topology, so the first publisher to connect creates it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        timeout: float | None = None,
        attempts: int | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        app_id: str = APP_ID,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.settings = settings
        self.timeout = settings.publish_timeout if timeout is None else timeout
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        self.attempts = attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.app_id = app_id
        self._sleep = sleep
        self._clock = clock
        self._transport: Transport | None = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.is_open

    @property
    def node(self) -> str | None:
        """``host:port`` of the broker node the connection is open to, if it is."""
        return self._transport.node if self.connected and self._transport else None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def connect(self, timeout: float | None = None) -> None:
        """Open the connection (and declare the topology) now, if it is not open."""
        if not self.connected:
            self.close()
            self._transport = Transport(
                self.settings,
                consume=False,
                name=self.app_id,
                timeout=self.timeout if timeout is None else timeout,
            )

    def service(self) -> None:
        """Answer heartbeats on an idle connection; drop it if it turns out to be gone.

        A blocking connection only talks to the broker when called, so one that sits idle for
        two heartbeat intervals is closed by the broker. Calling this more often keeps it alive.
        """
        if self._transport is None:
            return
        try:
            self._transport.sleep(0)
        except TransportError as e:
            # The node's loss is logged once for the process (consumer.brokers), not here for
            # each idle connection that notices it.
            log.debug("Idle broker connection lost (%s); will reconnect when needed.", e)
            self.close()

    def publish_once(
        self, body: bytes, properties: Properties, timeout: float | None = None
    ) -> None:
        """One attempt, within ``timeout`` seconds (connecting included; default the
        publisher's ``timeout``); raises :class:`PublishError` or :class:`TransportError`."""
        timeout = self.timeout if timeout is None else timeout
        deadline = self._clock() + timeout
        self.connect(timeout)
        assert self._transport is not None
        try:
            self._transport.publish(
                self.settings.exchange,
                self.settings.routing_key,
                body,
                properties,
                timeout=max(0.001, deadline - self._clock()),
            )
        except (PublishError, TransportError):
            # A fresh connection declares the topology again, which is also what repairs an
            # unroutable publish (a binding or queue deleted under us).
            self.close()
            raise

    def publish(
        self, env: Environ, *, message_id: str | None = None, timeout: float | None = None
    ) -> str | None:
        """Publish with confirms, retrying within the time budget; returns the message id.

        ``timeout`` overrides the publisher's budget for this message. Raises
        :class:`PublishError` (nacked, unroutable, not confirmed in time) or
        :class:`TransportError` (no broker node answered) once the budget is spent. A retry after
        a lost confirm may publish a second copy; the consumer recognises it by its message id.
        """
        body = encode(env)
        properties = message_properties(env, message_id, self.app_id)
        budget = self.timeout if timeout is None else timeout
        started = self._clock()
        deadline = started + budget
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        attempt = 0
        while True:
            attempt += 1
            try:
                self.publish_once(body, properties, max(0.001, deadline - self._clock()))
                if attempt > 1:
                    log.debug(
                        "Message %r confirmed after %d attempts in %.1f s.",
                        properties.message_id,
                        attempt,
                        self._clock() - started,
                    )
                return properties.message_id
            except (PublishError, TransportError) as e:
                remaining = deadline - self._clock()
                if remaining <= 0 or (self.attempts is not None and attempt >= self.attempts):
                    # The caller reports the failure: the error says what happened.
                    log.debug(
                        "Publish failed after %d attempt(s) in %.1f s: %s",
                        attempt,
                        self._clock() - started,
                        e,
                    )
                    raise
                delay = min(backoff.next(), remaining)
                log.debug("Publish attempt %d failed (%s); retrying in %.2f s.", attempt, e, delay)
                self._sleep(delay)


def publish(env: Environ, settings: Settings | None = None, **kwargs: Any) -> str | None:
    """Publish one environ on a short-lived connection (declaring the topology if needed).

    Keyword arguments go to :class:`Publisher` (``timeout``, ``attempts``, ``backoff_max``...),
    except ``message_id``, which overrides the ``group_id`` as the message's id.
    """
    message_id = kwargs.pop("message_id", None)
    with Publisher(settings or Settings(), **kwargs) as publisher:
        return publisher.publish(env, message_id=message_id)
