"""Fixtures: a real broker, per-test queue names, consumer processes, and waiting jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from consumer.config import Settings
from consumer.transport import connect
from tests.broker import BrokerUnavailable, RabbitNode, docker_reachable, wait_for_amqp

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("OIOIOI_FIXTURES", ROOT / "tests" / "fixtures"))

#: The upstream tier's tests run inside an upstream OIOIOI tree (tests/upstream/run), never here.
collect_ignore = ["upstream"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests about locking and concurrency run in the PostgreSQL pass of the suite (see .ci/run);
    # the SQLite pass deselects them (deselected, not skipped) and the PostgreSQL pass runs only
    # them, and the tests of SQL written for both databases (marked both_databases).
    on_postgres = bool(os.environ.get("TEST_DATABASE_URL"))
    keep, drop = [], []
    for item in items:
        if item.get_closest_marker("postgres"):
            wanted = on_postgres
        else:
            wanted = not on_postgres or bool(item.get_closest_marker("both_databases"))
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --- broker --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A real broker: TEST_AMQP_URL, else a container if Docker runs, else a private node."""
    url = os.environ.get("TEST_AMQP_URL")
    if url:
        wait_for_amqp(url, timeout=30)
        yield url
        return
    if docker_reachable():
        try:
            from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            with RabbitMqContainer("rabbitmq:3.13-management") as container:
                params = container.get_connection_params()
                url = f"amqp://guest:guest@{params.host}:{params.port}/%2F"
                wait_for_amqp(url)
                yield url
                return
    try:
        node = RabbitNode().start()
    except BrokerUnavailable as e:
        pytest.fail(f"No real RabbitMQ for the tests: {e}", pytrace=False)
    yield node.url
    node.stop()


@pytest.fixture
def private_broker() -> Iterator[RabbitNode]:
    """A broker node of this test's own, which it may stop and restart."""
    try:
        node = RabbitNode().start()
    except BrokerUnavailable as e:
        pytest.fail(f"Cannot start a private RabbitMQ node: {e}", pytrace=False)
    yield node
    node.stop()


def make_settings(amqp_url: str, **overrides: Any) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "exchange": f"{prefix}.workers",
        "queue": f"{prefix}.results",
        "dead_letter_queue": f"{prefix}.results.dead",
        "retry_queue": f"{prefix}.results.retry",
        "retry_delay_ms": 300,
        "max_retries": 2,
        "db_retry_initial": 0.05,
        "db_retry_max": 0.5,
        "db_probe_max": 1.0,
        "idle_tick": 0.2,
        "reconnect_max": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def queue_settings(amqp_url: str) -> Settings:
    """Topology names of this test's own on the session broker."""
    return make_settings(amqp_url)


class BrokerClient:
    """Direct access to the broker for assertions: publish raw, count, and read queues."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _channel(self) -> tuple[pika.BlockingConnection, Any]:
        # The first node that answers, when the settings name a cluster's.
        conn = connect(self.settings, name="oioioi-tests")[0]
        channel = conn.channel()
        channel.confirm_delivery()
        from consumer import topology

        topology.declare(channel, self.settings)
        return conn, channel

    def publish_raw(self, body: bytes, properties: pika.BasicProperties | None = None) -> None:
        conn, channel = self._channel()
        try:
            channel.basic_publish(
                self.settings.exchange, self.settings.routing_key, body, properties, mandatory=True
            )
        finally:
            conn.close()

    def publish_env(self, env: dict[str, Any], message_id: str | None = None) -> None:
        props = pika.BasicProperties(
            delivery_mode=2,
            message_id=message_id,
            timestamp=int(time.time()),
            content_type="application/json",
        )
        self.publish_raw(json.dumps(env).encode(), props)

    def depth(self, queue: str | None = None) -> int:
        conn, channel = self._channel()
        try:
            q = channel.queue_declare(queue or self.settings.queue, passive=True)
            return q.method.message_count
        finally:
            conn.close()

    def drain(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Take every message of ``queue`` (acking them): for queues the test owns."""
        conn, channel = self._channel()
        out = []
        try:
            while True:
                method, props, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    return out
                out.append((props, body))
                channel.basic_ack(method.delivery_tag)
        finally:
            conn.close()

    def wait_depth(self, queue: str, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (depth := self.depth(queue)) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"queue {queue!r} holds {depth}, expected {count}")
            time.sleep(0.1)


@pytest.fixture
def project_queues(settings: Any, queue_settings: Settings) -> Settings:
    """Point the project's Django settings (commands, admin views) at this test's own queues."""
    settings.AMQP_URL = queue_settings.amqp_url
    settings.RESULTS_EXCHANGE = queue_settings.exchange
    settings.RESULTS_ROUTING_KEY = queue_settings.routing_key
    settings.RESULTS_QUEUE = queue_settings.queue
    settings.RESULTS_DEAD_LETTER_QUEUE = queue_settings.dead_letter_queue
    settings.RESULTS_RETRY_QUEUE = queue_settings.retry_queue
    settings.RESULTS_QUEUE_TYPE = queue_settings.queue_type
    # The queues' arguments: a publisher in this process declares them as the consumer did.
    settings.RESULTS_RETRY_DELAY_MS = queue_settings.retry_delay_ms
    settings.RESULTS_DELIVERY_LIMIT = queue_settings.delivery_limit
    settings.RESULTS_MAX_RETRIES = queue_settings.max_retries
    return queue_settings


@pytest.fixture
def broker(queue_settings: Settings) -> BrokerClient:
    return BrokerClient(queue_settings)


# --- database and consumer processes --------------------------------------------------------------


def database_url() -> str:
    """The URL of the test database, for processes the tests start."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TEST_DATABASE_URL"}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=database_url(),
        AMQP_URL=settings.amqp_url,
        RESULTS_EXCHANGE=settings.exchange,
        RESULTS_ROUTING_KEY=settings.routing_key,
        RESULTS_QUEUE=settings.queue,
        RESULTS_DEAD_LETTER_QUEUE=settings.dead_letter_queue,
        RESULTS_RETRY_QUEUE=settings.retry_queue,
        RESULTS_QUEUE_TYPE=settings.queue_type,
        RESULTS_RETRY_DELAY_MS=str(settings.retry_delay_ms),
        RESULTS_MAX_RETRIES=str(settings.max_retries),
        RESULTS_DELIVERY_LIMIT=str(settings.delivery_limit),
        RESULTS_DB_RETRY_INITIAL=str(settings.db_retry_initial),
        RESULTS_DB_RETRY_MAX=str(settings.db_retry_max),
        RESULTS_DB_PROBE_MAX=str(settings.db_probe_max),
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="INFO",
        # Most tests assert on the broker's dead-letter queue: its archiver is for those that
        # ask for it (RESULTS_DEAD_LETTER_ARCHIVE="true").
        RESULTS_DEAD_LETTER_ARCHIVE="false",
    )
    env.update(extra)
    return env


class ConsumerProcess:
    """``manage.py start_receive_from_workers`` in a process of its own."""

    #: The program and its first arguments; ``args`` follow.
    command = [sys.executable, str(ROOT / "manage.py"), "start_receive_from_workers"]

    def __init__(self, settings: Settings, log_path: Path, args: list[str], **env: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.command, *args],
            cwd=ROOT,
            env=process_env(settings, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if not self.alive():
                raise AssertionError(f"consumer exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log}")
            time.sleep(0.05)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def start_consumer(
    tmp_path: Path, queue_settings: Settings
) -> Iterator[Callable[..., ConsumerProcess]]:
    started: list[ConsumerProcess] = []

    def start(
        *args: str, settings: Settings | None = None, ready: bool = True, **env: str
    ) -> ConsumerProcess:
        n = len(started)
        proc = ConsumerProcess(
            settings or queue_settings, tmp_path / f"consumer-{n}.log", list(args), **env
        )
        started.append(proc)
        if ready:
            proc.wait_for_log("Consuming from")
        return proc

    yield start
    for proc in started:
        proc.kill()


# --- jobs ----------------------------------------------------------------------------------------


def load_fixture(name: str) -> dict[str, Any]:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing (set OIOIOI_FIXTURES)", pytrace=False)
    return json.loads(path.read_text())


@pytest.fixture
def waiting_job() -> Callable[..., dict[str, Any]]:
    """Make a job WAITING for sioworkers the way OIOIOI does (its ``delay_environ``, with Celery
    eager as in upstream's tests); returns the environ sent out."""
    from django.db import transaction

    from oioioi.evalmgr.models import SavedEnviron
    from oioioi.evalmgr.tasks import delay_environ
    from tests.recipeapp.recipes import new_job_environ

    def make(submission_id: int = 1234, after: list[Any] | None = None) -> dict[str, Any]:
        env = new_job_environ(submission_id, after=after)
        with transaction.atomic():
            delay_environ(env)
        saved = SavedEnviron.objects.get(queued_job_id=env["job_id"])
        sent = saved.load_environ()
        sent["saved_environ_id"] = saved.id
        sent.pop("recipe", None)
        sent.pop("error_handlers", None)
        sent.pop("restore_environ_func", None)
        return sent

    return make


def result_for(sent: dict[str, Any], fixture: str = "sioworkersd_ping_env.json") -> dict[str, Any]:
    """What sioworkersd returns for ``sent``: a captured result environ, re-addressed to the job."""
    captured = load_fixture(fixture)
    env = dict(sent)
    env.update(captured)
    env["job_id"] = sent["job_id"]
    env["saved_environ_id"] = sent["saved_environ_id"]
    env["group_id"] = f"GROUP_{uuid.uuid4().urn}"
    return env


# --- the legacy HTTP shim ------------------------------------------------------------------------


class ShimProcess(ConsumerProcess):
    """``manage.py start_receive_from_workers --http-shim`` on a free loopback port."""

    def __init__(self, settings: Settings, log_path: Path, args: list[str], **env: str) -> None:
        from tests.broker import free_port

        self.port = free_port()
        super().__init__(
            settings,
            log_path,
            ["--http-shim", "--addr", "127.0.0.1", "--port", str(self.port), *args],
            **env,
        )


@pytest.fixture
def start_shim(tmp_path: Path, queue_settings: Settings) -> Iterator[Callable[..., ShimProcess]]:
    """Start shims; by default with a database URL nothing answers, to show it needs none."""
    started: list[ShimProcess] = []

    def start(
        *args: str, settings: Settings | None = None, ready: bool = True, **env: str
    ) -> ShimProcess:
        env.setdefault("DATABASE_URL", "postgres://nobody:none@127.0.0.1:9/nowhere")
        proc = ShimProcess(
            settings or queue_settings, tmp_path / f"shim-{len(started)}.log", list(args), **env
        )
        started.append(proc)
        if ready:
            proc.wait_for_log("HTTP shim listening")
        return proc

    yield start
    for proc in started:
        proc.kill()


# --- a Celery worker (the evalmgr workers of an OIOIOI) -------------------------------------------


class CeleryWorkerProcess(ConsumerProcess):
    """``celery -A oioioi.celery worker`` on this test's own evalmgr queue, tasks not eager."""

    command = [sys.executable, "-m", "celery", "-A", "oioioi.celery", "worker"]


@pytest.fixture
def celery_queue(queue_settings: Settings) -> str:
    """The evalmgr queue of this test's own (EVALMGR_CELERY_QUEUE)."""
    return f"{queue_settings.queue}.evalmgr"


@pytest.fixture
def start_celery_worker(
    tmp_path: Path, queue_settings: Settings, celery_queue: str
) -> Iterator[Callable[..., CeleryWorkerProcess]]:
    started: list[CeleryWorkerProcess] = []

    def start(**env: str) -> CeleryWorkerProcess:
        env = {**celery_env(queue_settings, celery_queue), **env}
        proc = CeleryWorkerProcess(
            queue_settings,
            tmp_path / f"celery-{len(started)}.log",
            [
                "-Q",
                celery_queue,
                "-P",
                "solo",
                "-l",
                "INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            **env,
        )
        started.append(proc)
        proc.wait_for_log("ready.")
        return proc

    yield start
    for proc in started:
        proc.kill()


def celery_env(settings: Settings, queue: str) -> dict[str, str]:
    """What a process needs to hand tasks to real Celery workers on ``queue``."""
    return {
        "CELERY_ALWAYS_EAGER": "0",
        "CELERY_BROKER_URL": settings.amqp_url,
        "EVALMGR_CELERY_QUEUE": queue,
    }
