"""The legacy HTTP shim: sioworkersd's result POSTs, forwarded into the results queue.

Unmodified sioworkersd returns a finished environ by POSTing a form with one field, ``data``, to the
environ's ``return_url``. The shim turns each such POST into one message on the results exchange and
answers ``200 OK`` only once the broker has confirmed it, so a result is either in the queue or still
held (and retried) by sioworkersd. It never touches the database.

Answers (sioworkersd counts anything but 200 as a failure and retries later):

====  ==========================================================================================
200   published and confirmed (also an object the consumer will refuse: it is dead-lettered there,
      where an operator sees it, instead of being retried by sioworkersd for days and then dropped)
400   the request cannot be turned into a JSON object (malformed form, no ``data``, not UTF-8 JSON,
      not an object), or is not valid HTTP
401   a token is configured and the request presents none; 403: it presents a wrong one
404   any method but POST (as upstream's receiver did)
408   the request did not arrive within the read timeout
411   no ``Content-Length`` (and not chunked); 413: the body is over the limit
415   the body is neither ``multipart/form-data`` nor ``application/x-www-form-urlencoded``
503   no broker node answered, or the broker did not accept the message (unroutable, nacked), or
      did not confirm it within the publish timeout (a cluster without a majority)
====  ==========================================================================================

Resources are bounded: a fixed pool of serving threads, each with its own broker connection (pika
connections are not thread-safe), a queue of accepted connections no longer than the pool, the
kernel's listen backlog behind it, and a deadline for reading each request.
"""

from __future__ import annotations

import contextlib
import email.parser
import hmac
import http.client
import http.server
import io
import logging
import queue
import socket
import socketserver
import string
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from consumer.config import Settings
from consumer.decode import parse_environ
from consumer.errors import ConsumerError, PublishError, TransportError
from consumer.observe import Observer
from consumer.publish import Publisher
from results_shim.form import Reject, form_data, identifiers

#: The queue library's logger tree, so one logging setup covers every line of the return path.
log = logging.getLogger("consumer.shim")

#: ``app_id`` of the messages the shim publishes, so an operator can tell where one came from.
APP_ID = "oioioi-http-shim"
#: Longest request or header line, and most header lines (http.client's limits).
MAX_LINE = 65536
MAX_HEADERS = 100
#: After refusing a request whose body was not read, read and discard at most this much (for
#: at most :data:`LINGER_SECONDS`) before closing, so the client sees the answer rather than a
#: connection reset caused by its unread data.
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ShimConfig:
    """The shim's limits and its optional shared secret."""

    #: Largest request body accepted; bigger ones get 413 before the body is read.
    max_body_bytes: int = 64 * 1024 * 1024
    #: Serving threads, hence also the most requests in progress and broker connections.
    threads: int = 16
    #: Seconds a client has to deliver its whole request (headers and body).
    read_timeout: float = 30.0
    #: When set, a request must present it (``Authorization: Bearer ...`` or ``?token=...``).
    auth_token: str | None = None
    #: Connections the kernel queues while every thread is busy.
    backlog: int = 128
    #: Seconds a request may spend having its result confirmed (connecting to a node that
    #: answers, publishing, the broker's confirm, and again after a failure) before the answer
    #: is 503. Short of a client's patience: sioworkersd keeps the result and tries later.
    publish_timeout: float = 10.0
    publish_backoff_max: float = 1.0

    def __post_init__(self) -> None:
        if self.threads < 1 or self.max_body_bytes < 1 or self.read_timeout <= 0:
            raise ValueError("need threads >= 1, max_body_bytes >= 1 and read_timeout > 0")
        if self.publish_timeout <= 0:
            raise ValueError("publish_timeout must be positive")


# --- reading with a deadline -------------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """A socket reader whose every read ends by one deadline for the whole request.

    A per-read timeout alone would let a client that sends a byte now and then hold a thread
    for ever.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


# --- the request handler ---------------------------------------------------------------------


class ServerHandler(http.server.BaseHTTPRequestHandler):
    """One request per connection: check, read, parse, publish, answer, log one line."""

    server: Server
    protocol_version = "HTTP/1.1"
    # Answer a request line without a version (or an unparsable one) with a status line too.
    default_request_version = "HTTP/1.0"
    server_version = "oioioi-shim"
    #: Told of every answered request; the server replaces this no-op with its own observer.
    observer: Observer = Observer()

    def setup(self) -> None:
        super().setup()
        self.config = self.server.config
        self.observer = self.server.observer
        self._reader = _DeadlineReader(self.connection, time.monotonic() + self.config.read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    # --- the request -------------------------------------------------------------------------

    def handle(self) -> None:
        self.handle_one_request()

    def handle_one_request(self) -> None:
        self._started = time.monotonic()
        self._logged = False
        self.close_connection = True
        self.raw_requestline = b""
        self.command = ""
        self.path = ""
        self.requestline = ""
        self.request_version = self.default_request_version
        self._status = 0
        self._size = 0
        self._ids: dict[str, Any] = {}
        self._expects_continue = False
        self._body_pending = False
        self._why = ""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                return  # connected and left without a word (a port check)
            if len(self.raw_requestline) > 65536:
                raise Reject(414, "request line too long")
            if not self.parse_request():
                return  # parse_request has answered (400, 431, 505...) through send_error
            self._serve()
        except Reject as r:
            self._answer(r.status, r.reason)
        except TimeoutError:
            self._answer(408, f"request not received within {self.config.read_timeout:g} s")
        except (ConnectionError, OSError) as e:
            log.debug("Client %s went away: %s", self.address_string(), e)
        except Exception:
            log.exception("Unexpected error while serving %s.", self.address_string())
            self._answer(500, "internal error")
        finally:
            if (self.raw_requestline or self._status) and not self._logged:
                self._finished()  # the client went away before an answer

    def parse_request(self) -> bool:
        """Read the request line and headers; answer and return False if they are not HTTP.

        Not the base class's: it parses headers with email's full message parser, which for a
        multipart ``Content-Type`` goes on to compile a regular expression for the boundary, new
        on every sioworkersd request; that was a fifth of the shim's time per request. Email's
        header parser does the same for the headers without looking for a body.
        """
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) == 3:
            version = words[2]
            number = _http_version(version)
            if number is None:
                self.send_error(400, f"Bad request version ({version!r})")
                return False
            if number >= (2, 0):
                self.send_error(505, f"Invalid HTTP version ({version[5:]})")
                return False
            self.request_version = version
        elif len(words) != 2 or words[0] != "GET":  # "GET /path" is HTTP/0.9
            self.send_error(400, f"Bad request syntax ({self.requestline!r})")
            return False
        self.command, self.path = words[0], words[1]
        lines = []
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise Reject(431, "header line too long")
            if line in (b"\r\n", b"\n", b""):
                break
            lines.append(line)
            if len(lines) > MAX_HEADERS:
                raise Reject(431, f"more than {MAX_HEADERS} header lines")
        parser = email.parser.HeaderParser(_class=http.client.HTTPMessage)
        self.headers = parser.parsestr(b"".join(lines).decode("iso-8859-1"))
        if self.headers.get("Expect", "").lower() == "100-continue" and _at_least_http11(
            self.request_version
        ):
            return self.handle_expect_100()
        return True

    def _serve(self) -> None:
        self._body_pending = bool(
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
            or self.headers.get("Transfer-Encoding")
        )
        if self.command != "POST":
            # Upstream's receiver answered 404 to everything but its POSTs.
            raise Reject(404, "not found")
        self._authorize()
        length = self._content_length()
        if self._expects_continue:
            # Only now: a refused request should be refused before its body is sent.
            self.send_response_only(100)
            self.end_headers()
        body = self._read_chunked() if length is None else self._read_exactly(length)
        self._body_pending = False
        self._size = len(body)
        data = form_data(self.headers.get("Content-Type"), body)
        try:
            env = parse_environ(data)
        except ConsumerError as e:
            raise Reject(400, str(e)) from None
        # Whether the consumer will accept the object is its business: a refused one goes to
        # the dead-letter queue, where an operator sees it, rather than back to sioworkersd.
        self._ids = identifiers(env)
        group_id = env.get("group_id")
        try:
            self.server.publisher().publish(
                data, message_id=group_id if isinstance(group_id, str) and group_id else None
            )
        except (PublishError, TransportError) as e:
            # Said once, in the request's own line; the broker node's loss has its own line.
            self._why = str(e)
            raise Reject(503, "broker unavailable, result not taken; try again later") from None
        self._answer(200, "OK")

    def _authorize(self) -> None:
        expected = self.config.auth_token
        if expected is None:
            return
        presented = self._presented_token()
        if presented is None:
            raise Reject(401, "authentication required")
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise Reject(403, "wrong token")

    def _presented_token(self) -> str | None:
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        # Unmodified sioworkersd sends no headers of ours, only the return_url it was given.
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        tokens = query.get("token")
        return tokens[0] if tokens else None

    # --- the body ----------------------------------------------------------------------------

    def _content_length(self) -> int | None:
        """The declared length, or None for a chunked body; refuses a body over the limit."""
        lengths = self.headers.get_all("Content-Length") or []
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if lengths:
                # Both at once is how requests are smuggled past proxies: refuse it outright.
                raise Reject(400, "both Transfer-Encoding and Content-Length")
            if encoding.strip().lower() != "chunked":
                raise Reject(400, f"unsupported Transfer-Encoding {encoding!r}")
            return None
        if not lengths:
            raise Reject(411, "Content-Length required")
        values = {value.strip() for value in lengths}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise Reject(400, "invalid Content-Length")
        length = int(next(iter(values)))
        if length > self.config.max_body_bytes:
            raise Reject(413, f"body over {self.config.max_body_bytes} bytes")
        return length

    def _read_exactly(self, length: int) -> bytes:
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise Reject(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not size_text or not _is_hex(size_text):
                raise Reject(400, "malformed chunked body")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > self.config.max_body_bytes:
                raise Reject(413, f"body over {self.config.max_body_bytes} bytes")
            body += self._read_exactly(size)
            if self.rfile.readline(3).rstrip(b"\r\n") != b"":
                raise Reject(400, "malformed chunked body")
        for _ in range(100):  # trailer fields, ignored
            if self.rfile.readline(65537) in (b"\r\n", b"\n", b""):
                break
        return bytes(body)

    # --- the answer --------------------------------------------------------------------------

    def handle_expect_100(self) -> bool:
        self._expects_continue = True
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Called by parse_request on malformed requests: answer in our own one-line form.
        self._answer(code, message or self.responses.get(code, ("error",))[0])

    def _answer(self, status: int, text: str) -> None:
        self._status = status
        self.close_connection = True
        # Logged before the answer is sent: a client that has its answer finds its request in
        # the log already, and lines follow the order in which answers went out.
        self._finished()
        body = text.encode() if status == 200 else f"{text}\n".encode()
        try:
            self.connection.settimeout(self.config.read_timeout)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            if status == 503:
                self.send_header("Retry-After", "10")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            if self._body_pending:
                self._linger()
        except OSError as e:
            log.debug("Could not answer %s: %s", self.address_string(), e)

    def _linger(self) -> None:
        """Let the client finish sending a body we refused, so that it reads our answer."""
        self.connection.shutdown(socket.SHUT_WR)
        self._reader.deadline = time.monotonic() + LINGER_SECONDS
        with contextlib.suppress(OSError):
            discarded = 0
            while discarded < LINGER_BYTES and (chunk := self.rfile.read1(65536)):
                discarded += len(chunk)

    # --- the log line ------------------------------------------------------------------------

    def _finished(self) -> None:
        self._logged = True
        seconds = time.monotonic() - self._started
        self.observer.request(self._status, seconds)
        path = urllib.parse.urlsplit(self.path).path  # never the query: it may hold the token
        log.log(
            logging.WARNING if self._why else logging.INFO,
            "%s %s %s -> %s, %d bytes, %.1f ms, job_id=%r group_id=%r submission_id=%r%s",
            self.address_string(),
            self.command or "-",
            path or "-",
            self._status or "no answer",
            self._size,
            seconds * 1000,
            self._ids.get("job_id"),
            self._ids.get("group_id"),
            self._ids.get("submission_id"),
            f" ({self._why})" if self._why else "",
            # The same ids as structured fields, for the JSON log format (LOG_FORMAT=json).
            extra={
                "message_id": self._ids.get("group_id"),
                "job_id": self._ids.get("job_id"),
                "group_id": self._ids.get("group_id"),
                "outcome": "published" if self._status == 200 else "refused",
            },
        )

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: :meth:`_finished` logs one line per request instead."""

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the base class would print the request line, whose query may hold a token."""

    def address_string(self) -> str:
        return str(self.client_address[0])


def _http_version(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of ``HTTP/x.y`` (RFC 2145: separate integers), None if malformed."""
    if not version.startswith("HTTP/"):
        return None
    parts = version[5:].split(".")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def _at_least_http11(version: str) -> bool:
    number = _http_version(version)
    return number is not None and number >= (1, 1)


def _is_hex(text: bytes) -> bool:
    return all(chr(c) in string.hexdigits for c in text)


# --- the server --------------------------------------------------------------------------------


class Server(http.server.HTTPServer):
    """A bounded pool of serving threads behind one listening socket.

    Constructed like upstream's (``Server((addr, port), ServerHandler)``), then ``serve_forever()``;
    :meth:`stop` may be called from a signal handler: it stops accepting, lets every accepted
    request finish and closes.
    """

    allow_reuse_address = True

    def __init__(
        self,
        server_address: tuple[str, int],
        handler_class: type[ServerHandler] = ServerHandler,
        *,
        settings: Settings | None = None,
        config: ShimConfig | None = None,
        observer: Observer | None = None,
        publisher_factory: Callable[[], Publisher] | None = None,
        bind_and_activate: bool = True,
    ) -> None:
        self.settings = settings or Settings()
        self.config = config or ShimConfig()
        self.observer = observer or Observer()
        self.request_queue_size = self.config.backlog
        self._publisher_factory = publisher_factory or self._default_publisher
        self._local = threading.local()
        # Room for one waiting connection per thread; beyond that, accept() waits and new
        # connections queue in the kernel's backlog, unread, so their deadlines have not started.
        self._connections: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(
            self.config.threads
        )
        self._threads: list[threading.Thread] = []
        #: True once :meth:`stop` was called.
        self.stopping = False
        super().__init__(server_address, handler_class, bind_and_activate)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up in DNS (getfqdn), which can stall a start.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def _default_publisher(self) -> Publisher:
        return Publisher(
            self.settings,
            timeout=self.config.publish_timeout,
            backoff_initial=0.1,
            backoff_max=self.config.publish_backoff_max,
            app_id=APP_ID,
        )

    # --- serving ---------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`stop`; then finish every accepted request and close."""
        self._start_threads()
        try:
            super().serve_forever(poll_interval)
        finally:
            self._accept_backlog()
            self.server_close()  # refuse new connections at once
            for _ in self._threads:
                self._connections.put(None)
            for thread in self._threads:
                thread.join()
            self._threads.clear()
            log.info("HTTP shim stopped.")

    def _accept_backlog(self) -> None:
        # Connections the kernel completed before the stop are clients already sending a result;
        # closing the listener would reset them, and sioworkersd would wait its retry delay.
        # Take them in, to be served like the rest, then close.
        self.socket.setblocking(False)
        while True:
            try:
                request, client_address = self.socket.accept()
            except OSError:
                return
            request.setblocking(True)
            self.process_request(request, client_address)

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return; safe from a signal handler on its own thread."""
        self.stopping = True
        threading.Thread(target=self.shutdown, name="shim-stop", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._connections.put((request, client_address))

    def publisher(self) -> Publisher:
        """The calling serving thread's own publisher."""
        publisher: Publisher = self._local.publisher
        return publisher

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("Unexpected error while serving %s.", client_address)

    # --- the serving threads ---------------------------------------------------------------

    def _start_threads(self) -> None:
        if self._threads:
            return
        for i in range(self.config.threads):
            thread = threading.Thread(target=self._serve_connections, name=f"shim-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve_connections(self) -> None:
        publisher = self._local.publisher = self._publisher_factory()
        heartbeat = self.settings.heartbeat
        idle_service = heartbeat / 2 if heartbeat > 0 else 10.0
        try:
            with contextlib.suppress(PublishError, TransportError):
                publisher.connect()  # warm up, so the first request does not pay for it
            while True:
                try:
                    item = self._connections.get(timeout=idle_service)
                except queue.Empty:
                    # An idle thread keeps its connection's heartbeats flowing.
                    publisher.service()
                    continue
                if item is None:
                    return
                request, client_address = item
                try:
                    self.finish_request(request, client_address)
                except Exception:
                    self.handle_error(request, client_address)
                finally:
                    self.shutdown_request(request)
        finally:
            publisher.close()


def serve(
    settings: Settings,
    config: ShimConfig,
    addr: str,
    port: int,
    *,
    observer: Observer | None = None,
    on_ready: Callable[[Server], None] | None = None,
) -> None:
    """Run the shim until its ``stop()`` is called (``on_ready`` gets the server to call it on)."""
    server = Server((addr, port), settings=settings, config=config, observer=observer)
    try:
        _check_broker(settings, config)
        if on_ready is not None:
            on_ready(server)
        log.info(
            "HTTP shim listening on %s:%d (%d threads, token %s), forwarding to exchange %r.",
            addr,
            server.server_port,
            config.threads,
            "required" if config.auth_token else "not required",
            settings.exchange,
        )
        server.serve_forever()
    finally:
        server.server_close()


def _check_broker(settings: Settings, config: ShimConfig) -> None:
    """Connect once at start to declare the topology and say early if the broker is away."""
    try:
        with Publisher(settings, attempts=1, timeout=config.publish_timeout) as publisher:
            publisher.connect()
    except (PublishError, TransportError) as e:
        log.warning("Broker not reachable at start (%s); answering 503 until it is.", e)
