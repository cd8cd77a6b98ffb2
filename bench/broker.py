"""The benchmark's side of RabbitMQ: its own queue names, filling, paced publishing, cleaning up."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import suppress
from typing import Any

import pika

from consumer import topology
from consumer.config import Settings

#: Confirmed publishes per second one publisher keeps up with comfortably on loopback; beyond it
#: the paced load is spread over more publishers, at most :data:`PUBLISHERS_MAX`.
PER_PUBLISHER = 300
PUBLISHERS_MAX = 8


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

    def publish_all(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Publish with confirms, without waiting for the queue (a consumer may be taking them)."""
        for message_id, body in messages:
            self._confirmed.basic_publish(
                self.settings.exchange,
                self.settings.routing_key,
                body,
                self._props(message_id),
                mandatory=True,
            )

    def paced(
        self, messages: Sequence[tuple[str, bytes]], rate: float
    ) -> tuple[dict[str, float], float]:
        """Publish at ``rate`` per second with confirms, as workers would.

        One confirmed publish at a time takes a round trip, so above :data:`PER_PUBLISHER` per
        second the messages are dealt round-robin to several publishers (threads with a
        connection each), each keeping to its share of the schedule. Returns the wall-clock time
        each message was handed to the broker, by message id, and the rate achieved (lower than
        asked when the publishers cannot keep up).
        """
        count = max(1, min(PUBLISHERS_MAX, math.ceil(rate / PER_PUBLISHER)))
        channels = [self._confirmed] + [self._extra_channel() for _ in range(count - 1)]
        sent: dict[str, float] = {}
        errors: list[BaseException] = []
        start = time.monotonic() + 0.05

        def publish(k: int) -> None:
            channel = channels[k]
            try:
                for i in range(k, len(messages), count):
                    message_id, body = messages[i]
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    sent[message_id] = time.time()
                    channel.basic_publish(
                        self.settings.exchange,
                        self.settings.routing_key,
                        body,
                        self._props(message_id),
                        mandatory=True,
                    )
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=publish, args=(k,)) for k in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        for channel in channels[1:]:
            with suppress(Exception):
                channel.connection.close()
        if errors:
            raise errors[0]
        achieved = (len(messages) - 1) / elapsed if elapsed > 0 and len(messages) > 1 else rate
        return sent, achieved

    def _extra_channel(self) -> Any:
        params = pika.URLParameters(self.settings.amqp_url)
        params.heartbeat = 0
        channel = pika.BlockingConnection(params).channel()
        channel.confirm_delivery()
        return channel

    def delete_everything(self, extra_queues: Sequence[str] = ()) -> None:
        s = self.settings
        for queue in (s.queue, s.retry_queue, s.dead_letter_queue, *extra_queues):
            with suppress(Exception):
                self._channel.queue_delete(queue)
        with suppress(Exception):
            self._channel.exchange_delete(s.exchange)
