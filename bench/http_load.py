"""Clients that call a receiver the way sioworkersd does, and what they measured.

sioworkersd (``taskmanager.returnToSio``) opens a fresh connection per result, POSTs a
``multipart/form-data`` body with one field ``data`` (the environ as JSON), sends
``Connection: close`` and waits for the answer; only a 200 counts. Here ``concurrency`` such
clients run at once (asyncio, one process), each taking the next body as soon as it is answered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

#: A request that has not been answered within this long counts as failed.
REQUEST_TIMEOUT = 60.0


def sioworkersd_request(body: bytes, host: str, port: int, path: str = "/") -> bytes:
    """The bytes sioworkersd sends for one result (headers in its order, CRLF line ends)."""
    boundary = uuid.uuid4().hex
    form = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="data"\r\n\r\n',
            body,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    head = (
        f"POST {path} HTTP/1.1\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(form)}\r\n"
        "User-Agent: sioworkersd\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Host: {host}:{port}\r\n\r\n"
    )
    return head.encode() + form


@dataclass
class LoadResult:
    concurrency: int
    #: (start, end) of each answered request, monotonic seconds.
    spans: list[tuple[float, float]] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def summary(self) -> dict[str, float]:
        from bench.stats import percentile

        latencies = sorted(end - start for start, end in self.spans)
        if not latencies:
            return {"requests": 0, "ok": 0, "errors": len(self.errors)}
        elapsed = max(e for _, e in self.spans) - min(s for s, _ in self.spans)
        return {
            "requests": len(self.spans) + len(self.errors),
            "ok": self.ok,
            "not_ok": len(self.spans) - self.ok,
            "errors": len(self.errors),
            "rps": self.ok / elapsed if elapsed > 0 else 0.0,
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "max_ms": 1000 * latencies[-1],
            "over_1s": sum(1 for x in latencies if x > 1.0),
        }


async def _one(host: str, port: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        response = await reader.read()  # the server closes the connection after answering
    finally:
        writer.close()
    status_line = response.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) >= 2 else 0


async def _run(
    host: str, port: int, requests: Sequence[bytes], concurrency: int, result: LoadResult
) -> None:
    queue = iter(requests)

    async def client() -> None:
        for request in queue:
            start = time.monotonic()
            try:
                status = await asyncio.wait_for(_one(host, port, request), REQUEST_TIMEOUT)
            except (TimeoutError, OSError, ValueError, IndexError) as e:
                result.errors.append(f"{type(e).__name__}: {e}")
                continue
            result.spans.append((start, time.monotonic()))
            result.statuses[status] = result.statuses.get(status, 0) + 1

    await asyncio.gather(*(client() for _ in range(concurrency)))


def run_load(host: str, port: int, requests: Sequence[bytes], concurrency: int) -> LoadResult:
    result = LoadResult(concurrency)
    asyncio.run(_run(host, port, requests, concurrency, result))
    return result
