"""The transport's prefetch against a real broker: cautious at first, then a whole batch at a time.

RabbitMQ applies ``basic.qos`` only to consumers started after it, so raising the prefetch of a
running consumer takes starting it again; without that every batch would be a single message.
"""

from __future__ import annotations

import time

import pika

from consumer.transport import Transport
from tests.conftest import make_settings


def publish(settings, count: int) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for i in range(count):
            channel.basic_publish(settings.exchange, settings.routing_key, f"m{i}".encode())
    finally:
        conn.close()


def receive_all(transport: Transport, count: int, timeout: float = 20.0) -> list[list[bytes]]:
    batches: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    while sum(len(b) for b in batches) < count:
        assert time.monotonic() < deadline, f"received {batches}"
        batch = transport.receive(32, 0.2)
        if batch:
            batches.append([d.body for d in batch])
            transport.ack(batch[-1], multiple=True)
    return batches


def test_first_delivery_alone_then_batches(amqp_url):
    settings = make_settings(amqp_url, prefetch=64, batch_size=32)
    with Transport(settings) as transport:
        # Given 100 messages waiting
        publish(settings, 100)
        # When the consumer takes them
        batches = receive_all(transport, 100)
    # Then the first comes alone (the cautious start) and the rest in full batches, in order
    assert len(batches[0]) == 1
    assert max(len(b) for b in batches) == 32
    assert len(batches) <= 8
    assert [m for b in batches for m in b] == [f"m{i}".encode() for i in range(100)]


def test_the_delivery_in_hand_is_still_acked_after_the_consumer_restarts(amqp_url):
    settings = make_settings(amqp_url, prefetch=8, batch_size=8)
    with Transport(settings) as transport:
        publish(settings, 3)
        first = transport.receive(8, 5.0)
        assert [d.body for d in first] == [b"m0"]
        # The consumer was started again with the larger prefetch; the first delivery's tag is
        # still good on the channel.
        transport.ack(first[-1], multiple=True)
        rest = receive_all(transport, 2)
    assert [m for b in rest for m in b] == [b"m1", b"m2"]
    # Nothing came back: every message was acked exactly once, none was requeued.
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        depth = conn.channel().queue_declare(settings.queue, passive=True).method.message_count
    finally:
        conn.close()
    assert depth == 0


def test_a_batch_is_cut_at_its_byte_limit_but_never_empty(amqp_url):
    settings = make_settings(amqp_url, prefetch=16, batch_size=16)
    with Transport(settings) as transport:
        # Given a small message, then five of 100 kB, then one of 300 kB
        conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        channel = conn.channel()
        channel.confirm_delivery()
        for body in [b"s", *[b"x" * 100_000] * 5, b"y" * 300_000]:
            channel.basic_publish(settings.exchange, settings.routing_key, body)
        conn.close()
        sizes: list[list[int]] = []
        deadline = time.monotonic() + 20
        while sum(len(b) for b in sizes) < 7:
            assert time.monotonic() < deadline, f"received {sizes}"
            # Let the broker push everything ahead first, so the limit is what cuts the batches.
            time.sleep(0.2)
            batch = transport.receive(16, 0.2, max_bytes=250_000)
            if batch:
                sizes.append([len(d.body) for d in batch])
                transport.ack(batch[-1], multiple=True)
    # Then each batch stays within 250 kB, except the message larger than that, which is alone
    assert sizes == [[1], [100_000, 100_000], [100_000, 100_000], [100_000], [300_000]]


def _publish_bodies(settings, bodies: list[bytes]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(settings.exchange, settings.routing_key, body)
    finally:
        conn.close()


def _drain(transport: Transport, count: int) -> list[list[int]]:
    """Batch sizes (in messages) as the consumer takes them, letting the broker push ahead
    everything it may first; every delivery must be a first one."""
    batches: list[list[int]] = []
    deadline = time.monotonic() + 30
    while sum(len(b) for b in batches) < count:
        assert time.monotonic() < deadline, f"received {batches}"
        time.sleep(0.1)
        batch = transport.receive(16, 0.2)
        if batch:
            assert not any(d.redelivered for d in batch)
            batches.append([len(d.body) for d in batch])
            transport.ack(batch[-1], multiple=True)
    return batches


def test_large_bodies_get_a_prefetch_that_keeps_them_within_a_batchs_bytes(amqp_url):
    # Given results of 100 kB and a batch of 600 kB: room for 300 kB of bodies in hand and on
    # their way (a prefetch of 16 would hold 1.6 MB)
    settings = make_settings(amqp_url, prefetch=16, batch_size=16, batch_bytes=600_000)
    with Transport(settings) as transport:
        _publish_bodies(settings, [b"x" * 100_000] * 20)
        batches = _drain(transport, 20)
    # Then after the first alone, the broker never sends more than three at a time
    assert batches[0] == [100_000]
    assert max(len(b) for b in batches[1:]) == 3
    assert sum(len(b) for b in batches) == 20


def test_the_prefetch_comes_down_when_the_bodies_grow_with_nothing_requeued(amqp_url):
    # Given small results, then many of 100 kB, with room for 300 kB of bodies
    settings = make_settings(amqp_url, prefetch=16, batch_size=16, batch_bytes=600_000)
    with Transport(settings) as transport:
        _publish_bodies(settings, [b"s"] * 2 + [b"x" * 100_000] * 60)
        batches = _drain(transport, 62)
    # Then the consumer, which took sixteen at a time, takes three at a time once it may change
    # its prefetch without a delivery on its way (every delivery above was a first one)
    assert max(len(b) for b in batches) == 16
    assert all(len(b) <= 3 for b in batches[-5:])
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        depth = conn.channel().queue_declare(settings.queue, passive=True).method.message_count
    finally:
        conn.close()
    assert depth == 0
