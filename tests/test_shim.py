"""The legacy HTTP shim, through a real shim process (the management command) and a real broker."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.models import ReceivedResult
from results_shim.form import Reject, form_data
from tests.conftest import FIXTURES, BrokerClient, make_settings, result_for
from tests.helpers import wait_until
from tests.recipeapp.models import StepLog

# --- talking HTTP over a raw socket, as sioworkersd does ----------------------------------------


def exchange(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send one request, read until the server closes; the answer's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def sioworkersd_request(fixture: str, env: dict[str, Any]) -> bytes:
    """A captured sioworkersd POST with only its JSON replaced (and Content-Length to match)."""
    raw = (FIXTURES / fixture).read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    boundary = re.search(rb"boundary=(\S+)", head).group(1)  # type: ignore[union-attr]
    start = body.index(b'name="data"\r\n\r\n') + len(b'name="data"\r\n\r\n')
    end = body.index(b"\r\n--" + boundary + b"--")
    body = body[:start] + json.dumps(env).encode() + body[end:]
    head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head)
    return head + b"\r\n\r\n" + body


def multipart_request(data: bytes, path: str = "/", headers: str = "") -> bytes:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="data"\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def request(body: bytes, headers: str, method: str = "POST") -> bytes:
    return f"{method} / HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


def good_env(**extra: Any) -> dict[str, Any]:
    env = {"group_id": f"GROUP_{uuid.uuid4().urn}", "job_id": "j", "workers_jobs.results": {}}
    env.update(extra)
    return env


# --- a real sioworkersd POST resumes the job -----------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("post", "env_fixture"),
    [
        ("sioworkersd_ping_post.txt", "sioworkersd_ping_env.json"),
        ("task_error_post.raw", "task_error_env.json"),
        ("validation_error_post.raw", "validation_error_env.json"),
    ],
)
def test_sioworkersd_post_is_confirmed_and_the_consumer_resumes_the_job(
    broker, start_shim, start_consumer, waiting_job, post, env_fixture
):
    # Given a waiting job and a shim that could not reach a database if it tried
    sent = waiting_job()
    result = result_for(sent, env_fixture)
    shim = start_shim()
    # When sioworkersd POSTs the result, byte for byte as it does
    status, body = exchange(shim.port, sioworkersd_request(post, result))
    # Then it is answered 200 OK, and the message is on the queue before any consumer runs
    assert (status, body) == (200, b"OK")
    assert broker.depth() == 1
    start_consumer()
    wait_until(lambda: not QueuedJob.objects.filter(job_id=sent["job_id"]).exists(), what="job")
    assert not SavedEnviron.objects.exists()
    received = ReceivedResult.objects.get()
    assert (received.key, received.job_id) == (result["group_id"], sent["job_id"])
    # A result with results runs the rest of the recipe; an error runs the error handlers.
    assert StepLog.objects.filter(job_id=sent["job_id"]).exists() == (
        "workers_jobs.results" in result and "error" not in result
    )
    broker.wait_depth(broker.settings.queue, 0)
    assert broker.depth(broker.settings.dead_letter_queue) == 0
    # One log line with the identifiers, and none of the body.
    [line] = [line for line in shim.log.splitlines() if "POST /sioworkersd-return/" in line]
    assert "-> 200" in line and repr(result["group_id"]) in line and "submission_id=1234" in line
    assert "swpeer-0" not in shim.log and "Traceback" not in shim.log


@pytest.mark.django_db(transaction=True)
def test_object_the_consumer_refuses_is_forwarded_and_dead_lettered(
    broker, start_shim, start_consumer
):
    # What sioworkersd sends when it fails internally while adding a group: no results, no error.
    env = {"group_id": "GROUP_broken", "workers_jobs": {"job0": {"job_type": "ping"}}}
    shim = start_shim()
    assert exchange(shim.port, multipart_request(json.dumps(env).encode())) == (200, b"OK")
    start_consumer()
    broker.wait_depth(broker.settings.dead_letter_queue, 1)
    [(props, dead)] = broker.drain(broker.settings.dead_letter_queue)
    assert json.loads(dead) == env
    assert props.message_id == "GROUP_broken"
    assert props.headers["x-oioioi-reason"] == "invalid"


# --- what is refused, and with what --------------------------------------------------------------

LIMIT = 64 * 1024

FORM = "application/x-www-form-urlencoded"


def post(
    body: bytes, content_type: str | None = FORM, length: int | None = None, extra: str = ""
) -> bytes:
    headers = f"Content-Type: {content_type}\r\n" if content_type else ""
    if length is not None or "Transfer-Encoding" not in extra:
        headers += f"Content-Length: {len(body) if length is None else length}\r\n"
    return request(body, headers + extra)


MULTIPART = "multipart/form-data; boundary=b0undary"


def multipart_body(*parts: tuple[str, bytes], end: bool = True) -> bytes:
    body = b"".join(
        b'--b0undary\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (name.encode(), value)
        for name, value in parts
    )
    return body + (b"--b0undary--\r\n" if end else b"")


BAD_REQUESTS: list[tuple[str, bytes, int, str]] = [
    ("GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not found"),
    ("GET other path", b"GET /sioworkersd-return/ HTTP/1.0\r\n\r\n", 404, "not found"),
    ("PUT", request(b"data=%7B%7D", "Content-Length: 11\r\n", "PUT"), 404, "not found"),
    ("no data field", post(multipart_body(("other", b"{}")), MULTIPART), 400, "no 'data' field"),
    ("two data fields", post(multipart_body(("data", b"{}"), ("data", b"{}")), MULTIPART), 400, "2 'data' fields"),
    ("urlencoded without data", post(b"x=1"), 400, "no 'data' field"),
    ("two urlencoded data", post(b"data=%7B%7D&data=%7B%7D"), 400, "2 'data' fields"),
    ("unterminated multipart", post(multipart_body(("data", b"{}"), end=False), MULTIPART), 400, "malformed multipart"),
    ("multipart garbage", post(b"no boundary in here", MULTIPART), 400, "malformed multipart"),
    ("multipart without boundary", post(b"--x--\r\n", "multipart/form-data"), 400, "without a boundary"),
    ("not JSON", multipart_request(b"{not json"), 400, "not JSON"),
    ("not UTF-8", multipart_request(b'{"a": "\xff"}'), 400, "not UTF-8"),
    ("JSON list", multipart_request(b"[1, 2]"), 400, "JSON object"),
    ("JSON string", post(b"data=%22x%22"), 400, "JSON object"),
    ("no Content-Type", post(b"data=%7B%7D", None), 415, "unsupported Content-Type"),
    ("JSON body", post(b"{}", "application/json"), 415, "unsupported Content-Type"),
    ("no Content-Length", request(b"", f"Content-Type: {FORM}\r\n"), 411, "Content-Length required"),
    ("bad Content-Length", request(b"", f"Content-Type: {FORM}\r\nContent-Length: ten\r\n"), 400, "invalid Content-Length"),
    ("two Content-Lengths", request(b"", f"Content-Type: {FORM}\r\nContent-Length: 1\r\nContent-Length: 2\r\n"), 400, "invalid Content-Length"),
    ("body shorter than declared", post(b"data=%7B%7D", length=50), 400, "body ended after 11 of 50"),
    ("over the limit", post(b"", length=LIMIT + 1), 413, "body over"),
    ("chunked over the limit", post(b"%x\r\n" % (LIMIT + 1), extra="Transfer-Encoding: chunked\r\n"), 413, "body over"),
    ("malformed chunk", post(b"zz\r\ndata\r\n0\r\n\r\n", extra="Transfer-Encoding: chunked\r\n"), 400, "malformed chunked"),
    ("chunked and length", post(b"0\r\n\r\n", length=5, extra="Transfer-Encoding: chunked\r\n"), 400, "both"),
    ("other transfer coding", post(b"x", extra="Transfer-Encoding: gzip\r\n"), 400, "unsupported Transfer-Encoding"),
    ("not HTTP", b"HELLO\r\n\r\n", 400, "Bad request"),
    ("HTTP/0.9 POST", b"POST /\r\n\r\n", 400, "Bad request syntax"),
    ("bad version", b"POST / HTTP/1.x\r\n\r\n", 400, "Bad request version"),
    ("odd version digits", b"POST / HTTP/\xb2.1\r\n\r\n", 400, "Bad request version"),
    ("HTTP/2", b"POST / HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version"),
    ("too many headers", b"POST / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431, "header lines"),
    ("header line too long", b"POST / HTTP/1.1\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n", 431, "too long"),
]  # fmt: skip


def test_bad_requests_get_their_status_and_publish_nothing(broker, start_shim):
    shim = start_shim(SHIM_MAX_BODY_BYTES=str(LIMIT))
    failures = []
    for name, raw, status, reason in BAD_REQUESTS:
        with socket.create_connection(("127.0.0.1", shim.port), timeout=30) as sock:
            sock.sendall(raw)
            # A client that sent its whole request and waits (the short body case relies on it).
            sock.shutdown(socket.SHUT_WR)
            got, body = read_answer(sock)
        if got != status or reason.encode() not in body or body.count(b"\n") > 1:
            failures.append(f"{name}: expected {status} {reason!r}, got {got} {body!r}")
    assert not failures, "\n".join(failures)
    assert broker.depth(broker.settings.queue) == 0
    assert broker.depth(broker.settings.dead_letter_queue) == 0
    assert shim.alive()
    # A refused client that keeps sending the body it announced still reads the refusal.
    big = request(b"data=" + b"x" * (2 * LIMIT), f"Content-Length: {2 * LIMIT + 5}\r\n")
    assert exchange(shim.port, big)[0] == 413


def test_other_encodings_of_a_good_request_are_accepted(broker, start_shim):
    shim = start_shim()
    envs = [good_env() for _ in range(4)]
    form = "Content-Type: application/x-www-form-urlencoded\r\n"
    urlencoded = b"data=" + json.dumps(envs[0]).replace(" ", "+").encode()
    chunked = b"data=" + json.dumps(envs[1]).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked), chunked)
    requests = [
        request(urlencoded, f"{form}Content-Length: {len(urlencoded)}\r\n"),
        request(chunked, f"{form}Transfer-Encoding: chunked\r\n"),
        multipart_request(json.dumps(envs[2]).encode(), path="/any/path?x=1"),
    ]
    for raw in requests:
        assert exchange(shim.port, raw) == (200, b"OK")
    # Expect: 100-continue is answered only once the headers pass, then the body is read.
    raw = multipart_request(json.dumps(envs[3]).encode(), headers="Expect: 100-continue\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", shim.port), timeout=30) as sock:
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        assert read_answer(sock) == (200, b"OK")
    broker.wait_depth(broker.settings.queue, 4)
    got = {
        props.message_id: json.loads(body) for props, body in broker.drain(broker.settings.queue)
    }
    assert got == {env["group_id"]: env for env in envs}


# --- the broker away ------------------------------------------------------------------------------


def test_broker_down_gives_503_and_the_shim_recovers_without_restart(private_broker, start_shim):
    settings = make_settings(private_broker.url)
    client = BrokerClient(settings)
    shim = start_shim(settings=settings)
    assert exchange(shim.port, multipart_request(json.dumps(good_env()).encode()))[0] == 200
    private_broker.stop_app()
    status, body = exchange(shim.port, multipart_request(json.dumps(good_env()).encode()))
    assert (status, body) == (503, b"broker unavailable, result not taken; try again later\n")
    private_broker.start_app()
    # The first request after the restart succeeds: the shim reconnects on its own.
    assert exchange(shim.port, multipart_request(json.dumps(good_env()).encode()))[0] == 200
    # Both answered 200 are in the queue, the 503 one is not (sioworkersd still has it).
    client.wait_depth(settings.queue, 2)
    assert shim.alive()


# --- load, slow clients, idle connections, signals ----------------------------------------------


def test_concurrent_clients_are_all_answered_and_all_messages_land(broker, start_shim):
    shim = start_shim(SHIM_THREADS="8")
    envs = [good_env(submission_id=i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(
                lambda env: exchange(shim.port, multipart_request(json.dumps(env).encode())), envs
            )
        )
    assert answers == [(200, b"OK")] * 32
    broker.wait_depth(broker.settings.queue, 32)
    ids = {props.message_id for props, _ in broker.drain(broker.settings.queue)}
    assert ids == {env["group_id"] for env in envs}


def test_slow_clients_do_not_hold_the_shim(broker, start_shim):
    shim = start_shim(SHIM_THREADS="4", SHIM_READ_TIMEOUT="6")
    head = request(
        b"", "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 500\r\n"
    )
    stalled = socket.create_connection(("127.0.0.1", shim.port), timeout=30)
    stalled.sendall(head + b"data=")  # headers and a little body, then nothing
    silent = socket.create_connection(("127.0.0.1", shim.port), timeout=30)  # not a byte
    trickle = socket.create_connection(("127.0.0.1", shim.port), timeout=30)
    trickle.sendall(head)
    stop_trickle = threading.Event()

    def drip() -> None:  # a byte now and then: only a deadline for the whole request ends it
        while not stop_trickle.wait(0.5):
            try:
                trickle.sendall(b"x")
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        assert exchange(shim.port, multipart_request(json.dumps(good_env()).encode()))[0] == 200
        # Answered while the slow ones are still being waited for...
        assert time.monotonic() - started < 4.0
        # ...which are then cut off by the deadline, the trickling one included.
        for sock in (stalled, silent, trickle):
            assert read_answer(sock)[0] == 408
        assert time.monotonic() - started < 15.0
    finally:
        stop_trickle.set()
        for sock in (stalled, silent, trickle):
            sock.close()
    assert broker.depth() == 1


def test_idle_broker_connections_are_kept_alive(broker, start_shim):
    # A 1 s heartbeat: an unserviced connection would be dropped by the broker within ~3 s.
    shim = start_shim(AMQP_HEARTBEAT="1", SHIM_THREADS="2")
    time.sleep(5)
    for _ in range(4):
        assert exchange(shim.port, multipart_request(json.dumps(good_env()).encode()))[0] == 200
    assert "Publish attempt 1 failed" not in shim.log
    assert "connection lost" not in shim.log
    broker.wait_depth(broker.settings.queue, 4)


def test_sigterm_finishes_the_request_in_progress_and_refuses_new_ones(broker, start_shim):
    shim = start_shim()
    raw = multipart_request(json.dumps(good_env()).encode())
    with socket.create_connection(("127.0.0.1", shim.port), timeout=30) as sock:
        sock.sendall(raw[:-40])
        time.sleep(0.3)
        shim.signal(signal.SIGTERM)
        shim.wait_for_log("SIGTERM received")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", shim.port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, timeout=10, what="the listening socket to close")
        sock.sendall(raw[-40:])
        assert read_answer(sock) == (200, b"OK")
    assert shim.proc.wait(30) == 0
    assert "HTTP shim stopped." in shim.log
    assert broker.depth() == 1


def test_sigterm_serves_connections_still_waiting_to_be_accepted(broker, start_shim):
    # Given one serving thread, held by a client still sending its request
    shim = start_shim(SHIM_THREADS="1")
    raws = [multipart_request(json.dumps(good_env()).encode()) for _ in range(4)]
    socks = [socket.create_connection(("127.0.0.1", shim.port), timeout=30) for _ in range(4)]
    try:
        socks[0].sendall(raws[0][:-40])
        time.sleep(0.5)
        # and three whole requests behind it: one waits for the thread, one for room in the
        # hand-off queue, one is still in the kernel's listen backlog
        for sock, raw in zip(socks[1:], raws[1:], strict=True):
            sock.sendall(raw)
        time.sleep(0.5)
        # When the shim is told to stop, and the first client finishes
        shim.signal(signal.SIGTERM)
        shim.wait_for_log("SIGTERM received")
        socks[0].sendall(raws[0][-40:])
        # Then every one of them is answered 200 and published, none reset
        assert [read_answer(sock) for sock in socks] == [(200, b"OK")] * 4
    finally:
        for sock in socks:
            sock.close()
    assert shim.proc.wait(30) == 0
    assert broker.depth() == 4


# --- authentication ------------------------------------------------------------------------------


def test_token_is_required_when_configured(broker, start_shim):
    shim = start_shim(SHIM_AUTH_TOKEN="s3cret-token")
    data = json.dumps(good_env()).encode()
    assert exchange(shim.port, multipart_request(data))[0] == 401
    assert (
        exchange(shim.port, multipart_request(data, headers="Authorization: Bearer no\r\n"))[0]
        == 403
    )
    assert exchange(shim.port, multipart_request(data, path="/?token=wrong"))[0] == 403
    ok = multipart_request(data, headers="Authorization: Bearer s3cret-token\r\n")
    assert exchange(shim.port, ok) == (200, b"OK")
    # Unmodified sioworkersd can only send what is in its return_url.
    assert (
        exchange(shim.port, multipart_request(data, path="/return/?token=s3cret-token"))[0] == 200
    )
    assert broker.depth() == 2
    assert "s3cret-token" not in shim.log


def test_no_token_configured_accepts_requests_without_one(broker, start_shim):
    shim = start_shim()
    assert exchange(shim.port, multipart_request(json.dumps(good_env()).encode()))[0] == 200
    assert "token not required" in shim.log


# --- the form, as a pure function -----------------------------------------------------------------


def test_form_data_takes_the_data_field_bytes_as_sent():
    raw = multipart_request(b'{"a": "\xc5\xbc"}')
    head, _, body = raw.partition(b"\r\n\r\n")
    content_type = re.search(rb"Content-Type: (.+)\r\n", head).group(1).decode()  # type: ignore[union-attr]
    assert form_data(content_type, body) == b'{"a": "\xc5\xbc"}'
    urlencoded = "application/x-www-form-urlencoded"
    assert form_data(urlencoded, b"x=1&data=%7B%22a%22:+1%7D") == b'{"a": 1}'
    assert form_data(urlencoded, b"data=%ff") == b"\xff"  # left for the JSON decoder to refuse
    with pytest.raises(Reject) as refused:
        form_data("text/plain", b"data=1")
    assert refused.value.status == 415
    with pytest.raises(Reject) as refused:
        form_data(urlencoded, b"&".join([b"a=1"] * 100))
    assert refused.value.status == 400
