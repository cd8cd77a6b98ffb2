"""Metrics and health endpoints for the consumer and the shim, as the command sets them up."""

from __future__ import annotations

import logging

from django.core.management.base import CommandError

from consumer.config import Settings
from oioioi.workers.conf import setting
from results_endpoints.health import BrokerWatch, HealthServer, serve
from results_endpoints.metrics import PrometheusObserver

log = logging.getLogger(__name__)


def metrics_port(option: int | None) -> int | None:
    """``--metrics-port`` if given, else ``METRICS_PORT``; None (off) when neither is set."""
    if option is not None:
        return option or None
    port: int | None = setting("METRICS_PORT")
    return port


class Observability:
    """The process's observer, and when a port is configured the health server reading it."""

    def __init__(self, observer: PrometheusObserver) -> None:
        self.observer = observer
        self.server: HealthServer | None = None
        self.watch: BrokerWatch | None = None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.server is not None:
            self.server.close()


def start(option: int | None, *, watch_broker: Settings | None = None) -> Observability:
    """Metrics, and health endpoints on ``--metrics-port`` / ``METRICS_PORT`` if either is set.

    Readiness of the consumer (``watch_broker`` None): connected to the broker and the database
    answering, as its loop last reported. Of the shim (``watch_broker`` its settings): a broker
    connection kept by a thread of its own. Never a check made on the request.
    """
    setup = Observability(PrometheusObserver())
    observer = setup.observer
    port = metrics_port(option)
    if port is None:
        return setup
    checks = {"broker": lambda: observer.broker_is_connected}
    if watch_broker is None:
        checks["database"] = lambda: observer.database_is_up
    try:
        setup.server = serve(port, observer.registry, checks, host=setting("METRICS_ADDR"))
    except OSError as e:
        raise CommandError(str(e)) from e
    if watch_broker is not None:
        setup.watch = BrokerWatch(watch_broker, observer).start()
    return setup
