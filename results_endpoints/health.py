"""``/healthz``, ``/readyz`` and ``/metrics`` on a port of their own, served from a daemon thread.

The answers come from state the process already keeps (what its observer was last told), so a
request does no I/O of its own, takes no lock the message path holds for long, and answers in
microseconds even while the consumer waits for a database or a broker. The server is bounded: a
few requests at a time (more are refused at once) and a short socket timeout, so a slow or
malicious client cannot tie it up.

``/healthz``
    200 while the process runs (its serving thread answering is the proof).
``/readyz``
    200 when every readiness check passes, else 503; the body lists the checks as JSON.
``/metrics``
    Prometheus text exposition of the process's registry.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from consumer.config import Settings
from consumer.errors import ConsumerError
from consumer.observe import Observer
from consumer.transport import Transport

#: The queue library's logger tree, so one logging setup covers every line of the return path.
log = logging.getLogger("consumer.health")

#: Name of a check -> whether it passes now. Must be cheap and must not block.
ReadinessChecks = Mapping[str, Callable[[], bool]]

#: Requests served at the same time; more are refused by closing their connection.
MAX_CONCURRENT = 8

#: Seconds a client may take to send its request line and headers.
REQUEST_TIMEOUT = 5.0


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer
    timeout = REQUEST_TIMEOUT
    # HTTP/1.0: one request per connection, so an idle keep-alive client holds no slot.
    protocol_version = "HTTP/1.0"
    server_version = "oioioi-results"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            status, body, ctype = 200, b"ok\n", "text/plain; charset=utf-8"
        elif path == "/readyz":
            ready, checks = self.server.readiness()
            status = 200 if ready else 503
            body = json.dumps({"ready": ready, "checks": checks}).encode() + b"\n"
            ctype = "application/json"
        elif path == "/metrics":
            status, body, ctype = 200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST
        else:
            status, body, ctype = 404, b"not found\n", "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes arrive every few seconds; they are not worth a log line each.
        log.debug("health %s: " + format, self.address_string(), *args)


class HealthServer(ThreadingHTTPServer):
    """The health endpoints on ``host:port``; ``start()`` serves them from a daemon thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        port: int,
        registry: CollectorRegistry,
        checks: ReadinessChecks,
        *,
        host: str = "0.0.0.0",
    ) -> None:
        self.registry = registry
        self.checks = dict(checks)
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        results: dict[str, bool] = {}
        for name, check in self.checks.items():
            try:
                results[name] = bool(check())
            except Exception:
                log.warning("Readiness check %r failed.", name, exc_info=True)
                results[name] = False
        return all(results.values()), results

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("Health request from %s failed.", client_address, exc_info=True)

    def start(self) -> HealthServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="health", daemon=True
        )
        self._thread.start()
        log.info("Serving /healthz, /readyz and /metrics on port %d.", self.port)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()


def serve(
    port: int, registry: CollectorRegistry, checks: ReadinessChecks, *, host: str = "0.0.0.0"
) -> HealthServer:
    """Bind and start serving; raises ``OSError`` when the port cannot be had."""
    try:
        return HealthServer(port, registry, checks, host=host).start()
    except OSError as e:
        raise OSError(e.errno, f"cannot serve health and metrics on {host}:{port}: {e}") from e


class BrokerWatch:
    """Keeps one idle broker connection and reports to ``observer`` whether it is up.

    For a process whose own connections come and go with its requests (the shim), this is what
    its readiness answers from: the check runs here, on a thread of its own, never on a request.
    """

    def __init__(self, settings: Settings, observer: Observer, *, interval: float = 2.0) -> None:
        self.settings = settings.replace(declare_topology=False)
        self.observer = observer
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)

    def start(self) -> BrokerWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)

    def _run(self) -> None:
        up: bool | None = None
        while not self._stop.is_set():
            try:
                with Transport(self.settings, consume=False) as transport:
                    self.observer.connected(True)
                    if up is False:
                        log.info("Broker reachable again: ready.")
                    up = True
                    while not self._stop.is_set():
                        # Services heartbeats; raises once the connection is gone.
                        transport.sleep(self.interval)
            except Exception as e:
                self.observer.connected(False)
                if up is not False:
                    # Once per outage, not once per attempt.
                    log.warning(
                        "Broker unreachable (%s): not ready.",
                        e,
                        exc_info=not isinstance(e, ConsumerError),
                    )
                up = False
            self._stop.wait(self.interval)
