"""Consumer configuration: one frozen object, built once at the edge (the management command).

Inside Django the settings come from ``oioioi.workers.conf``; a process without Django (``python -m
consumer publish``, sioworkersd's return path) reads the same environment variables through
:func:`from_environ`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from consumer.brokers import URL_SEPARATOR, split_urls
from consumer.redact import redact_url

QueueType = Literal["quorum", "classic"]


#: URL schemes a broker URL may have.
SCHEMES = ("amqp", "amqps")


def broker_urls(value: str) -> tuple[str, ...]:
    """The broker URLs of an ``AMQP_URL``: one, or a cluster's nodes separated by ``;``.

    Raises ``ValueError`` saying which entry is wrong and why, its password masked.
    """
    entries = split_urls(value)
    if entries == [""]:
        raise ValueError("AMQP_URL is empty")
    urls = []
    for number, entry in enumerate(entries, 1):
        where = f"entry {number} of {len(entries)}" if len(entries) > 1 else "the URL"
        if not entry:
            raise ValueError(
                f"AMQP_URL: {where} is empty (separate broker URLs with a single "
                f"{URL_SEPARATOR!r}, with none after the last)"
            )
        shown = f"{where} ({redact_url(entry)!r})"
        scheme = entry.partition("://")[0].lower() if "://" in entry else ""
        if scheme not in SCHEMES:
            raise ValueError(f"AMQP_URL: {shown} is not an amqp:// or amqps:// URL")
        if entry.count("://") > 1:
            raise ValueError(
                f"AMQP_URL: {shown} holds more than one URL; separate broker URLs with "
                f"{URL_SEPARATOR!r}"
            )
        try:
            parts = urlsplit(entry)
            parts.port  # noqa: B018 (raises for a port that is not a number)
        except ValueError as e:
            raise ValueError(f"AMQP_URL: {shown} cannot be read: {e}") from None
        if not parts.hostname:
            raise ValueError(f"AMQP_URL: {shown} names no host")
        urls.append(entry)
    return tuple(urls)


@dataclass(frozen=True)
class Settings:
    #: ``amqp://`` or ``amqps://`` URL of the broker, credentials included; or the URLs of a
    #: cluster's nodes separated by ``;`` (see :mod:`consumer.brokers`).
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    exchange: str = "oioioi.workers"
    routing_key: str = "results"
    queue: str = "oioioi.workers.results"
    dead_letter_queue: str = "oioioi.workers.results.dead"
    retry_queue: str = "oioioi.workers.results.retry"
    queue_type: QueueType = "quorum"
    #: Declare the topology on connect; off when the broker's definitions hold it and the user
    #: has no configure permission (a missing queue then shows as a connection error).
    declare_topology: bool = True
    #: Broker-side limit on deliveries of one message (quorum queues only).
    delivery_limit: int = 20
    #: Retries of an unexpected write error, through the retry queue, before dead-lettering.
    max_retries: int = 5
    retry_delay_ms: int = 10_000
    #: Deliveries the broker may push ahead of the acks; twice a batch, so that the next batch is
    #: there when one is written. Each is held in memory: at most this many message bodies.
    prefetch: int = 200
    #: Most results written in one transaction, and most bytes of their bodies (a batch of large
    #: environs is cut short: decoded, 1 MB of JSON takes several MB of memory).
    batch_size: int = 100
    batch_bytes: int = 8 * 1024 * 1024
    heartbeat: int = 30
    blocked_connection_timeout: float = 60.0
    #: Seconds of quiet after which the loop looks at its shutdown flag and sweeps.
    idle_tick: float = 1.0
    db_retry_attempts: int = 5
    db_retry_initial: float = 0.2
    db_retry_max: float = 5.0
    db_probe_max: float = 30.0
    reconnect_max: float = 30.0
    #: Seconds a publisher keeps trying to have one message confirmed (connecting, publishing,
    #: waiting for the confirm, and again after a failure) before it gives up: longer than a
    #: cluster takes to elect a queue's new leader.
    publish_timeout: float = 30.0

    def __post_init__(self) -> None:
        broker_urls(self.amqp_url)
        if self.publish_timeout <= 0:
            raise ValueError("publish_timeout must be positive")
        if self.queue_type not in ("quorum", "classic"):
            raise ValueError(f"queue_type must be 'quorum' or 'classic', not {self.queue_type!r}")
        if self.batch_size < 1 or self.prefetch < self.batch_size:
            raise ValueError("need 1 <= batch_size <= prefetch")
        if self.batch_bytes < 1:
            raise ValueError("batch_bytes must be at least 1")

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker URLs: one, or each node of a cluster."""
        return broker_urls(self.amqp_url)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def parse_bool(value: str) -> bool:
    """An environment variable's truth, as the Django settings read it (``1``, ``true``, ...)."""
    return value.strip().lower() in {"1", "true", "yes", "on"}


#: The broker and topology settings a process outside Django reads from its environment: each
#: variable (named as the Django setting) with the :class:`Settings` field it sets and its parser.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "AMQP_URL": ("amqp_url", str),
    "AMQP_HEARTBEAT": ("heartbeat", int),
    "AMQP_BLOCKED_CONNECTION_TIMEOUT": ("blocked_connection_timeout", float),
    "RESULTS_EXCHANGE": ("exchange", str),
    "RESULTS_ROUTING_KEY": ("routing_key", str),
    "RESULTS_QUEUE": ("queue", str),
    "RESULTS_DEAD_LETTER_QUEUE": ("dead_letter_queue", str),
    "RESULTS_RETRY_QUEUE": ("retry_queue", str),
    "RESULTS_QUEUE_TYPE": ("queue_type", str),
    "RESULTS_RETRY_DELAY_MS": ("retry_delay_ms", int),
    "RESULTS_DELIVERY_LIMIT": ("delivery_limit", int),
    "RESULTS_DECLARE_TOPOLOGY": ("declare_topology", parse_bool),
    "RESULTS_PUBLISH_TIMEOUT": ("publish_timeout", float),
}


def from_environ(environ: Mapping[str, str], **overrides: Any) -> Settings:
    """The broker settings from environment variables (:data:`ENVIRONMENT`); an unset or empty
    variable leaves the default. Raises ``ValueError`` for a value that does not parse."""
    values: dict[str, Any] = {}
    for name, (field_name, parse) in ENVIRONMENT.items():
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[field_name] = parse(raw)
        except ValueError:
            raise ValueError(f"{name} is not valid: {raw!r}") from None
    values.update(overrides)
    return Settings(**values)
