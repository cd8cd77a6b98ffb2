"""Prometheus metrics of the consumer and the HTTP shim, and the state readiness is judged by.

Each process gets a registry of its own (no global state, so tests can build as many as they like),
exposed by :mod:`results_endpoints.health` on ``/metrics``. Every label has a small fixed set of
values: an unknown outcome, reason or status is counted under ``other`` rather than growing a new
series. The README lists each metric and what it means.
"""

from __future__ import annotations

import re
import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from consumer.errors import PermanentError
from consumer.observe import Observer

NAMESPACE = "oioioi_results"

#: Outcomes a message can be settled with (see :mod:`consumer.policy`).
OUTCOMES = ("committed", "duplicate", "dead-lettered", "retried")

#: Reason of a message dead-lettered because its write kept failing (see consumer.policy).
FAILED = "failed"


def known_reasons() -> tuple[str, ...]:
    """Dead-letter reasons the library knows: each permanent error's ``reason``, and ``failed``.

    Anything else is counted as ``other``, so the label keeps a small fixed set of values.
    """
    found: set[str] = {FAILED}
    pending: list[type[PermanentError]] = [PermanentError]
    while pending:
        cls = pending.pop()
        found.add(cls.reason)
        pending.extend(cls.__subclasses__())
    return tuple(sorted(found))


#: Seconds; writes are milliseconds on a healthy database, seconds when it struggles.
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Seconds from publish to commit: near zero normally, hours after an outage or a backlog.
AGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)

#: Seconds per shim request: dominated by the broker's publish confirm.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# An HTTP status, or 0: the shim's "the client left before an answer".
_STATUS = re.compile(r"^(?:[1-5][0-9][0-9]|0)$")


def _label(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


def status_label(status: int | str) -> str:
    """An HTTP status as a label: the code itself when it is one, else ``other``."""
    text = str(status)
    return text if _STATUS.match(text) else "other"


class PrometheusObserver(Observer):
    """An :class:`~consumer.observe.Observer` that counts into a registry of its own.

    Also remembers whether the broker and the database were reachable when last seen, which is
    what ``/readyz`` answers from: the answer costs no I/O and never waits for the message path.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_metrics:
            # CPU, memory, open files, start time; and the Python version.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r = self.registry
        ns = NAMESPACE
        self.received_total = Counter(
            "received", "Deliveries taken from the results queue.", namespace=ns, registry=r
        )
        self.settled_total = Counter(
            "settled",
            "Messages settled, by outcome (committed, duplicate, dead-lettered, retried).",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.dead_lettered_total = Counter(
            "dead_lettered",
            "Messages copied to the dead-letter queue, by reason.",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.database_pauses_total = Counter(
            "database_pauses",
            "Times the consumer stopped taking messages because the database was unreachable.",
            namespace=ns,
            registry=r,
        )
        self.reconnects_total = Counter(
            "reconnects",
            "Broker connections re-established after a loss.",
            namespace=ns,
            registry=r,
        )
        self.write_seconds_hist = Histogram(
            "write_seconds",
            "Time to write one batch (decode to commit), including in-process retries.",
            namespace=ns,
            registry=r,
            buckets=WRITE_BUCKETS,
        )
        self.batch_size_hist = Histogram(
            "batch_size",
            "Messages written per transaction.",
            namespace=ns,
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.age_seconds_hist = Histogram(
            "age_seconds",
            "End-to-end age of a result at commit: now minus the message's publish timestamp.",
            namespace=ns,
            registry=r,
            buckets=AGE_BUCKETS,
        )
        self.broker_connected_gauge = Gauge(
            "broker_connected", "1 while connected to the broker.", namespace=ns, registry=r
        )
        self.database_up_gauge = Gauge(
            "database_up",
            "1 unless the last database operation found the database unreachable.",
            namespace=ns,
            registry=r,
        )
        self.shim_requests_total = Counter(
            "shim_requests",
            "HTTP requests the shim answered, by status code.",
            ["status"],
            namespace=ns,
            registry=r,
        )
        self.shim_request_seconds_hist = Histogram(
            "shim_request_seconds",
            "Time the shim took to answer a request (read, publish, confirm).",
            namespace=ns,
            registry=r,
            buckets=REQUEST_BUCKETS,
        )
        # Every labelled series exists from the start, so a rate() has a zero to start from.
        for outcome in (*OUTCOMES, "other"):
            self.settled_total.labels(outcome)
        self.reasons = known_reasons()
        for reason in (*self.reasons, "other"):
            self.dead_lettered_total.labels(reason)
        self._lock = threading.Lock()
        self._broker_connected = False
        # Unknown until the first database operation says otherwise; the command checks the
        # database at start, and a consumer that cannot reach it reports so on its first probe.
        self._database_up = True
        self.database_up_gauge.set(1)

    # --- the consumer loop ---------------------------------------------------------------------

    def received(self, count: int) -> None:
        self.received_total.inc(count)

    def settled(self, outcome: str, count: int = 1) -> None:
        self.settled_total.labels(_label(outcome, OUTCOMES)).inc(count)

    def dead_lettered(self, reason: str) -> None:
        self.dead_lettered_total.labels(_label(reason, self.reasons)).inc()

    def write_seconds(self, seconds: float, batch_size: int) -> None:
        self.write_seconds_hist.observe(seconds)
        self.batch_size_hist.observe(batch_size)

    def age_seconds(self, seconds: float) -> None:
        self.age_seconds_hist.observe(seconds)

    def database_pause(self) -> None:
        self.database_pauses_total.inc()

    def reconnected(self) -> None:
        self.reconnects_total.inc()

    def connected(self, up: bool) -> None:
        with self._lock:
            self._broker_connected = up
        self.broker_connected_gauge.set(1 if up else 0)

    def database_up(self, up: bool) -> None:
        with self._lock:
            self._database_up = up
        self.database_up_gauge.set(1 if up else 0)

    # --- the shim -----------------------------------------------------------------------------

    def request(self, status: int, seconds: float) -> None:
        self.shim_requests_total.labels(status_label(status)).inc()
        self.shim_request_seconds_hist.observe(seconds)

    # --- what readiness is judged by ------------------------------------------------------------

    @property
    def broker_is_connected(self) -> bool:
        with self._lock:
            return self._broker_connected

    @property
    def database_is_up(self) -> bool:
        with self._lock:
            return self._database_up
