"""The benchmark's side of RabbitMQ: its own queue names, filling, paced publishing, cleaning up."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import suppress

import pika

from consumer import topology
from consumer.config import Settings


def bench_settings(amqp_url: str, prefix: str | None = None) -> Settings:
    """Queue names of this run's own, so nothing of anyone else's is touched."""
    prefix = prefix or f"bench{uuid.uuid4().hex[:10]}"
    return Settings(
        amqp_url=amqp_url,
        exchange=f"{prefix}.workers",
        queue=f"{prefix}.results",
        dead_letter_queue=f"{prefix}.results.dead",
        retry_queue=f"{prefix}.results.retry",
    )


def celery_queue(settings: Settings) -> str:
    return f"{settings.exchange.rsplit('.', 1)[0]}.celery"


class Broker:
    """One connection for the benchmark's own bookkeeping and publishing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        params = pika.URLParameters(settings.amqp_url)
        params.heartbeat = 0  # long pauses between uses are normal here
        params.blocked_connection_timeout = 300
        self._conn = pika.BlockingConnection(params)
        self._channel = self._conn.channel()
        topology.declare(self._channel, settings)
        self._confirmed = self._conn.channel()
        self._confirmed.confirm_delivery()

    def close(self) -> None:
        with suppress(Exception):
            self._conn.close()

    def depth(self, queue: str | None = None) -> int:
        q = self._channel.queue_declare(queue or self.settings.queue, passive=True)
        return int(q.method.message_count)

    def wait_depth(self, count: int, queue: str | None = None, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while (depth := self.depth(queue)) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue holds {depth} messages, expected {count}")
            self._conn.sleep(0.05)

    def purge(self, queue: str | None = None) -> None:
        self._channel.queue_purge(queue or self.settings.queue)

    def _props(self, message_id: str) -> pika.BasicProperties:
        return pika.BasicProperties(
            message_id=message_id,
            delivery_mode=2,
            content_type="application/json",
            timestamp=int(time.time()),
        )

    def fill(self, messages: Iterable[tuple[str, bytes]], expected: int) -> None:
        """Publish without waiting for each confirm, then wait until the queue holds them all."""
        before = self.depth()
        for message_id, body in messages:
            self._channel.basic_publish(
                self.settings.exchange, self.settings.routing_key, body, self._props(message_id)
            )
        self.wait_depth(before + expected, timeout=300)

    def paced(
        self, messages: Sequence[tuple[str, bytes]], rate: float
    ) -> tuple[dict[str, float], float]:
        """Publish at ``rate`` per second with confirms, as a worker would.

        Returns the wall-clock time each message was handed to the broker, by message id, and
        the rate actually achieved (lower than asked when one publisher cannot keep up).
        """
        sent: dict[str, float] = {}
        start = time.monotonic()
        for i, (message_id, body) in enumerate(messages):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[message_id] = time.time()
            self._confirmed.basic_publish(
                self.settings.exchange,
                self.settings.routing_key,
                body,
                self._props(message_id),
                mandatory=True,
            )
        elapsed = time.monotonic() - start
        achieved = (len(messages) - 1) / elapsed if elapsed > 0 and len(messages) > 1 else rate
        return sent, achieved

    def delete_everything(self, extra_queues: Sequence[str] = ()) -> None:
        s = self.settings
        for queue in (s.queue, s.retry_queue, s.dead_letter_queue, *extra_queues):
            with suppress(Exception):
                self._channel.queue_delete(queue)
        with suppress(Exception):
            self._channel.exchange_delete(s.exchange)
