"""Real RabbitMQ brokers for tests: a URL from the environment, a container, or a private node.

A private node is a ``rabbitmq-server`` of its own (node name, ports, data and log folders), so a
test may stop or restart it without disturbing anyone else's broker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
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
        #: Plugins to enable (``rabbitmq_prometheus``, ...).
        self.plugins: list[str] = []

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME="/var/lib/rabbitmq" if os.geteuid() == 0 else env.get("HOME", ""),
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
        (self.base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=True)
        subprocess.run(
            self._server_command(),
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

    def _server_command(self) -> list[str]:
        """``rabbitmq-server -detached``, with as many open files as the machine allows.

        Run as root, Debian's wrapper switches to the ``rabbitmq`` user with ``su``, which resets
        the limit of open files to 1024. RabbitMQ sizes its file handles from that limit when it
        boots and stops accepting connections once they are used up: a node that has served a
        whole test session (about a thousand quorum queues, each with files of its own) then left
        new connections unanswered in the kernel's backlog, unseen by ``rabbitmqctl`` too. So as
        root the server is started as that user by ``setpriv``, which keeps the limit, raised to
        the hard limit first.
        """
        server = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        if os.geteuid() != 0 or not server.exists() or not shutil.which("setpriv"):
            return ["rabbitmq-server", "-detached"]
        return [
            "setpriv",
            "--reuid=rabbitmq",
            "--regid=rabbitmq",
            "--init-groups",
            "--",
            "sh",
            "-c",
            f'ulimit -n "$(ulimit -Hn)"; cd /var/lib/rabbitmq && exec {server} -detached',
        ]

    def open_files_limit(self) -> int | None:
        """The node's soft limit of open files (None before it has written its pid file)."""
        pid = self.pid()
        if pid is None:
            return None
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return None

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

    def pid(self) -> int | None:
        """The node's Erlang VM, as its pid file says (None before it has written one)."""
        try:
            return int((self.base / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the node's VM, as a crash or a power cut would end it; returns once it is gone."""
        pid = self.pid()
        if pid is None:
            raise BrokerUnavailable(f"{self.name} has no pid file")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"{self.name} (pid {pid}) did not die")
            time.sleep(0.05)
        (self.base / "pid").unlink(missing_ok=True)

    def restart(self, timeout: float = 90.0) -> RabbitNode:
        """Start a killed node again on its own data (a cluster member rejoins its cluster)."""
        # The node's distribution port may linger a moment after a SIGKILL; peers find the new
        # one through epmd.
        self.dist_port = free_port()
        return self.start(timeout)

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except Exception:
            pid = self.pid()
            if pid:
                subprocess.run(["kill", "-9", str(pid)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie nobody has reaped yet does not: PID 1 of a container may
    never reap a detached node)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class RabbitCluster:
    """Private nodes joined into one cluster on loopback (see ../shared/RABBITMQ.md).

    ``url`` is the list of every node's URL, as ``AMQP_URL`` takes it. Quorum queues declared
    once the cluster is formed have a member on every node.
    """

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RabbitNode() for _ in range(size)]

    @property
    def url(self) -> str:
        return ";".join(node.url for node in self.nodes)

    def urls(self, *order: int) -> str:
        """The nodes' URLs in another order (indexes into ``nodes``)."""
        return ";".join(self.nodes[i].url for i in order)

    def start(self) -> RabbitCluster:
        # Side by side: a node takes 5 to 15 s to start, mostly waiting.
        _all([node.start for node in self.nodes])
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.start_app()
        status = first.ctl("cluster_status", "--formatter", "json")
        for node in self.nodes:
            if status.count(node.name) < 2:  # among the disc nodes and the running ones
                raise BrokerUnavailable(f"{node.name} is not a running member:\n{status}")
        return self

    def by_name(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    def by_port(self, port: int) -> RabbitNode:
        return next(node for node in self.nodes if node.port == port)

    def live(self) -> list[RabbitNode]:
        return [node for node in self.nodes if (pid := node.pid()) and _alive(pid)]

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl`` on a live node."""
        last: Exception | None = None
        for node in self.live():
            try:
                return node.ctl(*args, timeout=timeout)
            except (BrokerUnavailable, subprocess.TimeoutExpired) as e:
                last = e
        raise BrokerUnavailable(f"no live node answered rabbitmqctl {' '.join(args)}: {last}")

    def queue_info(self, queue: str) -> dict[str, str]:
        """``leader``, ``members`` and ``online`` of a quorum queue, as rabbitmqctl lists them."""
        out = self.ctl(
            "list_queues", "-q", "--no-table-headers", "name", "leader", "members", "online"
        )
        for line in out.splitlines():
            name, _, rest = line.partition("\t")
            if name == queue:
                leader, members, online = rest.split("\t")
                return {"leader": leader, "members": members, "online": online}
        raise AssertionError(f"queue {queue!r} not listed:\n{out}")

    def leader(self, queue: str) -> RabbitNode:
        return self.by_name(self.queue_info(queue)["leader"])

    def wait_online(self, queues: list[str], count: int, timeout: float = 90.0) -> None:
        """Until each queue has ``count`` members online (a restarted node has caught up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                infos = [self.queue_info(q) for q in queues]
                if all(i["online"].count("@") == count for i in infos):
                    return
            except (BrokerUnavailable, AssertionError, ValueError) as e:
                infos = [{"error": str(e)}]
            if time.monotonic() > deadline:
                raise AssertionError(f"not {count} members online within {timeout:.0f} s: {infos}")
            time.sleep(0.5)

    def stop(self) -> None:
        _all([node.stop for node in self.nodes])


def _all(calls: Iterable[Callable[[], object]]) -> None:
    """Run the calls side by side; raise the first error once all have ended."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def docker_reachable() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
