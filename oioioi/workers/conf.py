"""Builds the consumer's frozen settings from Django's, once, when a command starts."""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings

from consumer.config import Settings


def consumer_settings(**overrides: Any) -> Settings:
    s = django_settings
    values: dict[str, Any] = {
        "amqp_url": s.AMQP_URL,
        "exchange": s.RESULTS_EXCHANGE,
        "routing_key": s.RESULTS_ROUTING_KEY,
        "queue": s.RESULTS_QUEUE,
        "dead_letter_queue": s.RESULTS_DEAD_LETTER_QUEUE,
        "retry_queue": s.RESULTS_RETRY_QUEUE,
        "declare_topology": s.RESULTS_DECLARE_TOPOLOGY,
        "queue_type": s.RESULTS_QUEUE_TYPE,
        "delivery_limit": s.RESULTS_DELIVERY_LIMIT,
        "max_retries": s.RESULTS_MAX_RETRIES,
        "retry_delay_ms": s.RESULTS_RETRY_DELAY_MS,
        "prefetch": s.RESULTS_PREFETCH,
        "batch_size": s.RESULTS_BATCH_SIZE,
        "batch_bytes": s.RESULTS_BATCH_BYTES,
        "heartbeat": s.AMQP_HEARTBEAT,
        "blocked_connection_timeout": s.AMQP_BLOCKED_CONNECTION_TIMEOUT,
        "db_retry_attempts": s.RESULTS_DB_RETRY_ATTEMPTS,
        "db_retry_initial": s.RESULTS_DB_RETRY_INITIAL,
        "db_retry_max": s.RESULTS_DB_RETRY_MAX,
        "db_probe_max": s.RESULTS_DB_PROBE_MAX,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
