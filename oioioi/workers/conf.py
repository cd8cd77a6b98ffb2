"""The return path's settings, each with a default, read once when a command starts.

A value comes from Django's settings if the settings module names it, else from the environment
variable of the same name, else from :data:`DEFAULTS`. So an OIOIOI deployment needs no edit of
its settings file (it may set any of these there), and the standalone project's settings need not
repeat them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError

from consumer.config import Settings
from consumer.transport import connection_parameters


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _optional(value: str) -> str | None:
    return value or None


def _port(value: str) -> int | None:
    return int(value) or None


#: Every setting of the return path: its default and how to read it from an environment variable.
DEFAULTS: dict[str, tuple[Any, Callable[[str], Any]]] = {
    # The broker and the queue topology.
    "AMQP_URL": ("amqp://guest:guest@127.0.0.1:5672/%2F", str),
    "AMQP_HEARTBEAT": (30, int),
    "AMQP_BLOCKED_CONNECTION_TIMEOUT": (60.0, float),
    "RESULTS_EXCHANGE": ("oioioi.workers", str),
    "RESULTS_ROUTING_KEY": ("results", str),
    "RESULTS_QUEUE": ("oioioi.workers.results", str),
    "RESULTS_DEAD_LETTER_QUEUE": ("oioioi.workers.results.dead", str),
    "RESULTS_RETRY_QUEUE": ("oioioi.workers.results.retry", str),
    "RESULTS_DECLARE_TOPOLOGY": (True, _bool),
    "RESULTS_QUEUE_TYPE": ("quorum", str),
    "RESULTS_DELIVERY_LIMIT": (20, int),
    "RESULTS_MAX_RETRIES": (5, int),
    "RESULTS_RETRY_DELAY_MS": (10_000, int),
    "RESULTS_PREFETCH": (200, int),
    "RESULTS_BATCH_SIZE": (100, int),
    "RESULTS_BATCH_BYTES": (8 * 1024 * 1024, int),
    "RESULTS_PUBLISH_TIMEOUT": (30.0, float),
    # The database retry policy and housekeeping.
    "RESULTS_DB_RETRY_ATTEMPTS": (5, int),
    "RESULTS_DB_RETRY_INITIAL": (0.2, float),
    "RESULTS_DB_RETRY_MAX": (5.0, float),
    "RESULTS_DB_PROBE_MAX": (30.0, float),
    "RESULTS_INBOX_RETENTION_DAYS": (30, int),
    "RESULTS_DEAD_LETTER_ARCHIVE": (True, _bool),
    # The hand-off to the recipe runner (oioioi.workers.dispatch).
    "EVALMGR_DISPATCHER": ("oioioi.workers.dispatch.CeleryDispatcher", str),
    "EVALMGR_RUN_LEASE_SECONDS": (300, int),
    "EVALMGR_RELAY_LEASE_SECONDS": (600, int),
    "EVALMGR_STALE_JOB_SECONDS": (3600, int),
    # The legacy HTTP shim (upstream names its address and port the same).
    "SIOWORKERS_LISTEN_ADDR": ("127.0.0.1", str),
    "SIOWORKERS_LISTEN_PORT": (7890, int),
    "SHIM_AUTH_TOKEN": (None, _optional),
    "SHIM_MAX_BODY_BYTES": (64 * 1024 * 1024, int),
    "SHIM_THREADS": (16, int),
    "SHIM_READ_TIMEOUT": (30.0, float),
    "SHIM_PUBLISH_TIMEOUT": (10.0, float),
    # Health and metrics.
    "METRICS_PORT": (None, _port),
    "METRICS_ADDR": ("0.0.0.0", str),
}


def from_environment(name: str) -> Any:
    """The setting's value from the environment, else its default (no Django involved)."""
    default, parse = DEFAULTS[name]
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else parse(raw)


def setting(name: str) -> Any:
    """The setting's value: Django's settings, else the environment, else the default."""
    if name not in DEFAULTS:
        raise KeyError(f"{name} is not a setting of the return path")
    if hasattr(django_settings, name):
        return getattr(django_settings, name)
    return from_environment(name)


def consumer_settings(**overrides: Any) -> Settings:
    """The consumer library's frozen settings, from this project's; raises
    ``ImproperlyConfigured`` for a value the library refuses (a malformed ``AMQP_URL``)."""
    values: dict[str, Any] = {
        "amqp_url": setting("AMQP_URL"),
        "exchange": setting("RESULTS_EXCHANGE"),
        "routing_key": setting("RESULTS_ROUTING_KEY"),
        "queue": setting("RESULTS_QUEUE"),
        "dead_letter_queue": setting("RESULTS_DEAD_LETTER_QUEUE"),
        "retry_queue": setting("RESULTS_RETRY_QUEUE"),
        "declare_topology": setting("RESULTS_DECLARE_TOPOLOGY"),
        "queue_type": setting("RESULTS_QUEUE_TYPE"),
        "delivery_limit": setting("RESULTS_DELIVERY_LIMIT"),
        "max_retries": setting("RESULTS_MAX_RETRIES"),
        "retry_delay_ms": setting("RESULTS_RETRY_DELAY_MS"),
        "prefetch": setting("RESULTS_PREFETCH"),
        "batch_size": setting("RESULTS_BATCH_SIZE"),
        "batch_bytes": setting("RESULTS_BATCH_BYTES"),
        "heartbeat": setting("AMQP_HEARTBEAT"),
        "blocked_connection_timeout": setting("AMQP_BLOCKED_CONNECTION_TIMEOUT"),
        "db_retry_attempts": setting("RESULTS_DB_RETRY_ATTEMPTS"),
        "db_retry_initial": setting("RESULTS_DB_RETRY_INITIAL"),
        "db_retry_max": setting("RESULTS_DB_RETRY_MAX"),
        "db_probe_max": setting("RESULTS_DB_PROBE_MAX"),
        "publish_timeout": setting("RESULTS_PUBLISH_TIMEOUT"),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = Settings(**values)
        connection_parameters(settings)  # what pika itself refuses in a URL, refused now
    except ValueError as e:
        # A malformed AMQP_URL (its password masked in the text) or an impossible value: every
        # command and page stops here, at start, saying which.
        raise ImproperlyConfigured(str(e)) from None
    return settings


def command_settings(**overrides: Any) -> Settings:
    """:func:`consumer_settings` for a management command: a refused value stops it at start
    with a ``CommandError`` (the reason on standard error, exit status 1), not a traceback."""
    try:
        return consumer_settings(**overrides)
    except ImproperlyConfigured as e:
        raise CommandError(str(e)) from None
