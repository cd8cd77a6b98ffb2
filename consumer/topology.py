"""Exchanges and queues of the results path, declared idempotently by whoever connects first.

::

    worker ──publish──▶ [oioioi.workers] ──results──▶ (oioioi.workers.results) ──▶ consumer
                                                          │ delivery limit
                          consumer ── dead-letter ───────▶├───────────────────▶ (…results.dead)
                          consumer ── retry later ──▶ (…results.retry) ──TTL──▶ back to the exchange

The results and retry queues dead-letter to the dead-letter and results routes *at least once*
(quorum queues only; classic queues lose that guarantee, see the README).
"""

from __future__ import annotations

from typing import Any

from consumer.config import Settings


def results_queue_arguments(settings: Settings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        # Where the broker puts a message that exceeded the delivery limit (a consumer crashing on
        # it again and again): the dead-letter queue, through the default exchange.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dead_letter_queue,
    }
    if settings.queue_type == "quorum":
        args["x-delivery-limit"] = settings.delivery_limit
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


def retry_queue_arguments(settings: Settings) -> dict[str, Any]:
    # A fixed queue-wide TTL: per-message expiry would only be honoured at the head of the queue,
    # so a long delay at the head would hold shorter ones behind it.
    args: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        "x-message-ttl": settings.retry_delay_ms,
        "x-dead-letter-exchange": settings.exchange,
        "x-dead-letter-routing-key": settings.routing_key,
    }
    if settings.queue_type == "quorum":
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


def dead_letter_queue_arguments(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": settings.queue_type}


def declare(channel: Any, settings: Settings) -> None:
    """Declare the exchange, the three queues and the binding on a pika channel."""
    channel.exchange_declare(exchange=settings.exchange, exchange_type="direct", durable=True)
    channel.queue_declare(
        queue=settings.dead_letter_queue,
        durable=True,
        arguments=dead_letter_queue_arguments(settings),
    )
    channel.queue_declare(
        queue=settings.queue, durable=True, arguments=results_queue_arguments(settings)
    )
    channel.queue_declare(
        queue=settings.retry_queue, durable=True, arguments=retry_queue_arguments(settings)
    )
    channel.queue_bind(
        queue=settings.queue, exchange=settings.exchange, routing_key=settings.routing_key
    )
