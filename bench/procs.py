"""Processes the benchmark starts (the real command, the shim, the legacy receiver) and their logs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from consumer.config import Settings

ROOT = Path(__file__).resolve().parent.parent

#: The consumer's line after each commit (``consumer.loop._log_outcomes``), as bench.settings
#: formats it: wall-clock time of the record, then the message.
_OUTCOME = re.compile(rb"^(\d+\.\d+) \w+ consumer\.loop: Result '([^']*)' (\w+)\.", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(settings: Settings, database_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="bench.settings",
        DATABASE_URL=database_url,
        AMQP_URL=settings.amqp_url,
        RESULTS_EXCHANGE=settings.exchange,
        RESULTS_ROUTING_KEY=settings.routing_key,
        RESULTS_QUEUE=settings.queue,
        RESULTS_DEAD_LETTER_QUEUE=settings.dead_letter_queue,
        RESULTS_RETRY_QUEUE=settings.retry_queue,
        RESULTS_QUEUE_TYPE=settings.queue_type,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
        LOG_LEVEL="INFO",
        LOG_FORMAT="human",
    )
    env.update(extra)
    return env


class Proc:
    """A child process with its output in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.time_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: {text!r} not logged in {timeout} s:\n{self.tail()}"
                )
            time.sleep(0.05)

    def wait_for_port(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} is not listening on {port}") from None
                time.sleep(0.1)

    def rss(self) -> tuple[int, int]:
        """(current, peak) resident set size in KiB, from /proc, of the process and its child
        processes together (a consumer's recipe runner): the sum of their peaks, which is at
        least the peak of their sum."""
        rss = hwm = 0
        for pid in (self.pid, *_children(self.pid)):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            for line in status.splitlines():
                key, _, rest = line.partition(":")
                if key == "VmRSS":
                    rss += int(rest.split()[0])
                elif key == "VmHWM":
                    hwm += int(rest.split()[0])
        return rss, hwm

    def stop(self, timeout: float = 30.0) -> int | None:
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    return self.proc.wait(10)
            return self.proc.returncode
        finally:
            self._log.close()


def manage(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "manage.py"), *args]


class OutcomeTail:
    """Reads a consumer's log as it grows: when each result was settled, and how."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rest = b""
        #: key -> (wall-clock time of the log record, outcome)
        self.outcomes: dict[str, tuple[float, str]] = {}
        self.committed = 0

    def poll(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        data = self._rest + chunk
        cut = data.rfind(b"\n") + 1
        self._rest = data[cut:]
        for m in _OUTCOME.finditer(data[:cut]):
            key, outcome = m.group(2).decode(), m.group(3).decode()
            self.outcomes[key] = (float(m.group(1)), outcome)
            if outcome == "committed":
                self.committed += 1
        return self.committed

    def wait(self, count: int, proc: Proc, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.poll() < count:
            if not proc.alive():
                raise RuntimeError(f"consumer exited ({proc.proc.returncode}):\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {self.committed} of {count} results committed in {timeout:.0f} s:\n"
                    f"{proc.tail(1500)}"
                )
            time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (from every thread's list in /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return out
