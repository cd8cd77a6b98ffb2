"""Fixtures of the end-to-end tests inside upstream OIOIOI (``tests/upstream/run`` copies this
folder into an installed upstream tree as ``results_e2e``).

Everything is real: PostgreSQL (the test database, migrated as a deployment's is), RabbitMQ (this
run's own queues), a filetracker server, Celery workers and consumers in processes of their own,
started with upstream's code and ``results_e2e.settings``.

Fixtures meant for reuse by other test modules here:

- ``migrated_db`` (session): the name of the migrated test database the processes share;
- ``run_settings`` (session): the consumer library's ``Settings`` for this run's broker and queues;
- ``process_env`` (session): the environment for a process of this run (settings, database,
  queues, filetracker);
- ``broker``: a :class:`BrokerClient` on this run's queues (publish raw, depth, drain, browse);
- ``start_consumer`` and ``start_worker``: start ``start_receive_from_workers`` and Celery
  workers, stopped after the test;
- ``filetracker_server`` (session, autouse): the filetracker every process uses;
- ``park_job``, ``sent_group``: a job parked by upstream's evaluation manager, and the group it
  sent to (the recording) sioworkers.

Every test leaves this run's queues empty (``empty_queues``, autouse).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pytest
from django.conf import settings
from results_e2e.backends import group_path

from consumer import topology
from consumer.config import Settings

#: The installed upstream tree (results_e2e's parent): the processes' working folder and path.
TREE = Path(__file__).resolve().parent.parent
SETTINGS_MODULE = "results_e2e.settings"
TMP = Path(settings.TMP)
#: The virtualenv's scripts first on the path: filetracker-server runs gunicorn from it.
PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

_timings: dict[str, float] = {}
#: The processes the running test started: their logs go into its report if it fails.
_processes: list[Process] = []


# --- reporting ------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Iterator[None]:
    started = time.monotonic()
    yield
    if fixturedef.argname == "django_db_setup":
        # pytest-django's fixture and the override below, one after the other.
        what = "test database created and migrated"
        _timings[what] = _timings.get(what, 0.0) + time.monotonic() - started


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for what, seconds in _timings.items():
        terminalreporter.write_line(f"results_e2e: {what} in {seconds:.1f} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in _processes:
            lines = proc.log.splitlines()[-150:]
            report.sections.append((f"log of {proc.name} (pid {proc.pid})", "\n".join(lines)))
    if report.when == "teardown":
        _processes.clear()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    # The scratch folder (logs, filetracker store) is kept when something failed.
    if exitstatus == 0:
        shutil.rmtree(TMP, ignore_errors=True)
    else:
        print(f"\nresults_e2e: the run's logs and files are kept in {TMP}")


@pytest.fixture(autouse=True)
def upstream_test_setup() -> None:
    """What upstream's own conftest does before each test (its root conftest.py is not ours)."""
    from django.core.cache import cache
    from oioioi.contests.current_contest import set_cc_id

    cache.clear()
    set_cc_id(None)


# --- waiting -------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


# --- the database and the run's settings ---------------------------------------------------------


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: Any, django_db_blocker: Any) -> None:
    """pytest-django's test database, migrated (our pytest.ini does not say ``--nomigrations``),
    less the tables no model has.

    Upstream's migrations leave two such tables behind (``oi`` 0002 moves ``Region`` and
    ``OIOnsiteRegistration`` to ``participants`` in the migration state only): their foreign keys
    to ``contests_contest`` and ``participants_participant`` make the ``TRUNCATE`` with which
    Django empties the database after each transactional test fail. No code reads them.
    """
    from django.db import connection

    with django_db_blocker.unblock():
        introspection = connection.introspection
        orphans = set(introspection.table_names()) - set(
            introspection.django_table_names(only_existing=True, include_views=False)
        )
        orphans.discard("django_migrations")
        with connection.cursor() as cursor:
            for table in sorted(orphans):
                cursor.execute(f"DROP TABLE {connection.ops.quote_name(table)} CASCADE")


@pytest.fixture(scope="session")
def migrated_db(django_db_setup: Any, django_db_blocker: Any) -> str:
    """The test database, with every migration applied (a consumer refuses to start without)."""
    from django.db import connection

    return str(connection.settings_dict["NAME"])


@pytest.fixture(scope="session")
def run_settings() -> Settings:
    """The consumer library's settings for this run: the broker and the run's own queues."""
    from oioioi.workers.conf import consumer_settings

    return consumer_settings()


@pytest.fixture(scope="session")
def process_env(migrated_db: str) -> dict[str, str]:
    """The environment of a process of this run: the settings, the test database, the queues."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    pythonpath = [str(TREE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        DJANGO_SETTINGS_MODULE=SETTINGS_MODULE,
        PYTHONPATH=os.pathsep.join(dict.fromkeys(pythonpath)),
        RESULTS_E2E_DATABASE=migrated_db,
        # Chosen when the settings were loaded here (RUN, TMP, the filetracker's URL): the same
        # values in every process.
        RESULTS_E2E_RUN=settings.RUN,
        RESULTS_E2E_TMP=str(TMP),
        RESULTS_E2E_FILETRACKER_URL=settings.FILETRACKER_URL,
        PYTHONUNBUFFERED="1",
        PATH=PATH,
        # sioworkers caches files under ~/.filetracker_cache: keep that in the run's folder.
        HOME=str(TMP / "home"),
    )
    return env


# --- processes -----------------------------------------------------------------------------------


class Process:
    """A process of this run, its output in a log file; stopped with SIGTERM, else SIGKILL."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self.log_path = TMP / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        # A session of its own, so that what it starts (gcc, a solution) is stopped with it.
        self.proc = subprocess.Popen(
            list(args),
            cwd=TREE,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _processes.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still runs after {timeout} s:\n{self.log}") from None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL (the whole session) if it is not gone by then."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def start_consumer(process_env: dict[str, str]) -> Iterator[Callable[..., Process]]:
    """Start ``python -m django start_receive_from_workers [args]`` (extra environment as
    keyword arguments); by default waits until it consumes."""
    started: list[Process] = []

    def start(*args: str, ready: bool = True, **env: str) -> Process:
        proc = Process(
            f"consumer-{uuid.uuid4().hex[:6]}",
            [sys.executable, "-m", "django", "start_receive_from_workers", *args],
            {**process_env, **env},
        )
        started.append(proc)
        if ready:
            proc.wait_for_log("Consuming from")
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def start_worker(process_env: dict[str, str]) -> Iterator[Callable[..., Process]]:
    """Start a Celery worker on the queue upstream routes ``evalmgr_job`` to (this run's), with
    the sioworkers backend named (the recording one by default); waits until it is ready."""
    started: list[Process] = []
    queue = settings.CELERY_ROUTES["oioioi.evalmgr.tasks.evalmgr_job"]["queue"]

    def start(backend: str = "results_e2e.backends.RecordingBackend", **env: str) -> Process:
        name = f"worker-{uuid.uuid4().hex[:6]}"
        proc = Process(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "oioioi.celery",
                "worker",
                "-Q",
                queue,
                "-P",
                "solo",
                "-n",
                f"e2e-{settings.RUN}-{name}@%h",
                # With its event heartbeat (every 2 s) the worker's loop wakes up often enough
                # to see a SIGTERM at once; without it, it waits up to 10 s.
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
            {**process_env, "RESULTS_E2E_SIOWORKERS_BACKEND": backend, **env},
        )
        started.append(proc)
        proc.wait_for_log(" ready.")
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session", autouse=True)
def filetracker_server() -> Iterator[str]:
    """A filetracker server for every process of the run (upstream's tests keep files in one
    process's memory); returns its URL."""
    url = settings.FILETRACKER_URL
    port = url.rsplit(":", 1)[1]
    store = TMP / "filetracker-store"
    store.mkdir(parents=True, exist_ok=True)
    server = Process(
        "filetracker",
        [
            str(Path(sys.executable).parent / "filetracker-server"),
            "-d",
            str(store),
            "-l",
            "127.0.0.1",
            "-p",
            port,
            "-D",
        ],
        {**os.environ, "PATH": PATH},
    )

    def answers() -> bool:
        if not server.alive():
            raise AssertionError(f"filetracker-server exited:\n{server.log}")
        try:
            with urllib.request.urlopen(f"{url}/version", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(answers, what=f"filetracker-server at {url}")
    yield url
    server.stop()


# --- the broker ----------------------------------------------------------------------------------


class BrokerClient:
    """Direct access to this run's queues, for assertions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _connect(self) -> tuple[pika.BlockingConnection, Any]:
        conn = pika.BlockingConnection(pika.URLParameters(self.settings.amqp_url))
        channel = conn.channel()
        channel.confirm_delivery()
        topology.declare(channel, self.settings)
        return conn, channel

    def publish_raw(self, body: bytes, message_id: str | None = None) -> None:
        conn, channel = self._connect()
        try:
            channel.basic_publish(
                self.settings.exchange,
                self.settings.routing_key,
                body,
                pika.BasicProperties(delivery_mode=2, message_id=message_id),
                mandatory=True,
            )
        finally:
            conn.close()

    def depth(self, queue: str | None = None) -> int:
        conn, channel = self._connect()
        try:
            return channel.queue_declare(
                queue or self.settings.queue, passive=True
            ).method.message_count
        finally:
            conn.close()

    def wait_depth(self, queue: str, count: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.depth(queue) == count, timeout, f"{count} message(s) in {queue}")

    def drain(self, queue: str) -> list[tuple[Any, bytes]]:
        """Take every message of ``queue`` (acking them)."""
        conn, channel = self._connect()
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

    def browse(self, queue: str | None = None) -> list[str | None]:
        """The message ids of what ``queue`` holds, left in it (taken unacked, then given back
        as the channel closes). Only while nobody consumes it."""
        conn, channel = self._connect()
        ids = []
        try:
            while True:
                method, props, _ = channel.basic_get(queue or self.settings.queue, auto_ack=False)
                if method is None:
                    return ids
                ids.append(props.message_id)
        finally:
            conn.close()

    def purge(self, *queues: str) -> None:
        conn, channel = self._connect()
        try:
            for queue in queues:
                try:
                    channel.queue_purge(queue)
                except pika.exceptions.ChannelClosedByBroker:
                    channel = conn.channel()  # not declared yet: nothing to purge
        finally:
            conn.close()

    def delete(self, queues: Sequence[str], exchanges: Sequence[str]) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.settings.amqp_url))
        try:
            for kind, names in (("queue", queues), ("exchange", exchanges)):
                for name in names:
                    channel = conn.channel()
                    try:
                        if kind == "queue":
                            channel.queue_delete(name)
                        else:
                            channel.exchange_delete(name)
                        channel.close()
                    except pika.exceptions.ChannelClosedByBroker:
                        pass
        finally:
            conn.close()


def _celery_queues() -> list[str]:
    return [route["queue"] for route in settings.CELERY_ROUTES.values()]


@pytest.fixture(scope="session")
def _run_broker(run_settings: Settings) -> Iterator[BrokerClient]:
    client = BrokerClient(run_settings)
    yield client
    s = run_settings
    # The run's queues and exchanges go with it (Celery names a queue's exchange after it).
    client.delete(
        [s.queue, s.retry_queue, s.dead_letter_queue, *_celery_queues()],
        [s.exchange, *_celery_queues()],
    )


@pytest.fixture
def broker(_run_broker: BrokerClient) -> BrokerClient:
    return _run_broker


@pytest.fixture(autouse=True)
def empty_queues(_run_broker: BrokerClient) -> Iterator[None]:
    """Each test starts with this run's queues empty, and leaves them so for the next."""
    s = _run_broker.settings
    queues = [s.queue, s.retry_queue, s.dead_letter_queue, *_celery_queues()]
    _run_broker.purge(*queues)
    yield
    _run_broker.purge(*queues)


# --- jobs ----------------------------------------------------------------------------------------


@pytest.fixture
def park_job() -> Callable[..., dict[str, Any]]:
    """Queue a job with upstream's ``delay_environ``; a Celery worker then runs upstream's
    ``evalmgr_job`` on it, whose first phase transfers it to sioworkers with upstream's
    ``transfer_job`` (its ``restore_job`` by default). Returns the environ queued."""
    from django.db import transaction

    from oioioi.evalmgr.tasks import create_environ, delay_environ

    def park(restore: str | None = None, crash_flag: Path | None = None) -> dict[str, Any]:
        env = create_environ()
        transfer_kwargs: dict[str, Any] = {}
        if restore:
            transfer_kwargs["restore"] = restore
        if crash_flag:
            transfer_kwargs["crash_flag"] = str(crash_flag)
        env["recipe"] = [
            ("transfer", "results_e2e.recipes.transfer_to_workers", transfer_kwargs),
            ("record", "results_e2e.recipes.record", {"step": "after-results"}),
        ]
        with transaction.atomic():
            delay_environ(env)
        return env

    return park


def sent_group(job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The group sent to sioworkers for ``job_id`` (recorded by the worker), once it is there;
    with the pid of the process that sent it under ``"pid"``."""
    path = group_path(job_id)
    wait_until(path.exists, timeout, f"the job group of {job_id} to be sent")
    record = json.loads(path.read_text())
    return {**record["env"], "pid": record["pid"]}


def sioworkersd_result(sent: dict[str, Any]) -> dict[str, Any]:
    """What sioworkersd returns for a group of ping jobs: the group with a group id, and each
    job's result."""
    result = {k: v for k, v in sent.items() if k != "pid"}
    group_id = "GROUP_" + uuid.uuid4().urn
    result["group_id"] = group_id
    result["workers_jobs.results"] = {
        name: {**job, "group_id": group_id, "pong": job["ping"]}
        for name, job in sent["workers_jobs"].items()
    }
    return result


def steps(job_id: str) -> list[tuple[str, int]]:
    """The recorded steps of a job, in order, with the pid of the process that ran each."""
    from results_e2e.models import StepLog

    return list(StepLog.objects.filter(job_id=job_id).order_by("id").values_list("step", "pid"))


def job_finished(job_id: str) -> Callable[[], bool]:
    """A predicate: the job ran its step after the results, and its job and run are gone."""
    from results_e2e.models import StepLog

    from oioioi.evalmgr.models import QueuedJob
    from oioioi.workers.models import PendingRun

    return lambda: (
        StepLog.objects.filter(job_id=job_id, step="after-results").exists()
        and not QueuedJob.objects.filter(job_id=job_id).exists()
        and not PendingRun.objects.filter(job_id=job_id).exists()
    )
