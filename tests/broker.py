"""Real RabbitMQ brokers for tests: a URL from the environment, a container, or a private node.

A private node is a ``rabbitmq-server`` of its own (node name, ports, data and log folders), so a
test may stop or restart it without disturbing anyone else's broker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika


class BrokerUnavailable(RuntimeError):
    """No real broker could be had; the run fails with this message rather than skipping."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_amqp(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
            return
        except Exception as e:
            last = e
            time.sleep(0.3)
    raise BrokerUnavailable(f"broker at {url} did not answer within {timeout:.0f} s: {last!r}")


class RabbitNode:
    """A private ``rabbitmq-server`` node on free ports, in a temporary folder."""

    def __init__(self) -> None:
        if not shutil.which("rabbitmq-server") or not shutil.which("rabbitmqctl"):
            raise BrokerUnavailable(
                "rabbitmq-server/rabbitmqctl are not installed (apt-get install rabbitmq-server), "
                "no Docker engine is reachable and TEST_AMQP_URL is not set"
            )
        self.name = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="rabbit-node-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        #: Appended to the node's rabbitmq.conf (TLS listeners, load_definitions, ...).
        self.extra_config = ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.base / "pid"),
        )
        return env

    def start(self, timeout: float = 90.0) -> RabbitNode:
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\n"
            # guest may log in from loopback only, which is where the tests are.
            "loopback_users.guest = true\n"
            "log.console = false\n" + self.extra_config
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=True)
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self._env(),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # -detached returns before the node has registered with epmd, and await_startup fails at
        # once on a node it cannot see yet: poll until it answers.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup", "--timeout", "30", timeout=40)
                break
            except BrokerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        wait_for_amqp(self.url, timeout=30)
        return self

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        proc = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            log = ""
            for f in (self.base / "log").glob("*.log"):
                log += f.read_text(errors="replace")[-3000:]
            raise BrokerUnavailable(
                f"rabbitmqctl {' '.join(args)} failed on {self.name}: {proc.stderr.strip()}\n{log}"
            )
        return proc.stdout

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        wait_for_amqp(self.url, timeout=60)

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "test")

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except Exception:
            pid = (self.base / "pid").read_text().strip() if (self.base / "pid").exists() else ""
            if pid:
                subprocess.run(["kill", "-9", pid], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def docker_reachable() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
