"""A real sioworkersd for the end-to-end tests of its return to the queue (test_sioworkersd.py).

``tests/upstream/run`` prepares sioworkersd's environment as an operator would: a virtualenv with
sioworkers 1.5.9 and no Django, into which ``deploy/sioworkersd/install`` installed the return
path; it names the interpreter in ``RESULTS_E2E_SIOWORKERSD_PYTHON`` and sioworkers' ``twistd`` in
``RESULTS_E2E_TWISTD``. Here :class:`Sioworkersd` runs ``twistd sioworkersd-amqp`` and one
``twistd worker`` from it, and :func:`private_node` gives the tests a RabbitMQ node of their own
(the standalone suite's ``RabbitNode``), which they may stop under sioworkersd.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pika
from django.db import transaction
from results_e2e.conftest import PATH, TMP, Process, wait_until

from consumer.config import ENVIRONMENT, Settings

#: The tapname the return path's twistd plugin registers.
TAPNAME = "sioworkersd-amqp"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise AssertionError(
            f"{name} is not set: run these tests through tests/upstream/run, which prepares "
            "sioworkersd's environment"
        )
    return value


def private_node() -> Any:
    """A started private RabbitMQ node (``tests/broker.py``'s ``RabbitNode``, loaded from this
    project's checkout, ``RESULTS_PROJECT_ROOT``)."""
    path = Path(_required("RESULTS_PROJECT_ROOT")) / "tests" / "broker.py"
    spec = importlib.util.spec_from_file_location("results_project_broker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RabbitNode().start()


class Sioworkersd:
    """``twistd sioworkersd-amqp`` and a ``twistd worker`` (4 slots), on free ports, with a task
    database in the run's folder; the broker settings in a file of their own (mode 0600), the
    way an operator gives them (``--amqp-env-file``), and nothing of them in the environment."""

    def __init__(self, name: str, broker: Settings) -> None:
        self.name = name
        self.python = _required("RESULTS_E2E_SIOWORKERSD_PYTHON")
        self.twistd = _required("RESULTS_E2E_TWISTD")
        self.rpc_port = free_port()
        self.worker_port = free_port()
        self.database = TMP / f"{name}.db"
        self.env_file = TMP / f"{name}.env"
        # Every variable the return path reads, with this run's values (the queues' arguments
        # must match the consumer's).
        values = {var: getattr(broker, field) for var, (field, _) in ENVIRONMENT.items()}
        lines = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
        self.env_file.write_text("\n".join(lines) + "\n")
        self.env_file.chmod(0o600)
        # sioworkersd's own environment: no PYTHONPATH, no Django settings, no broker URL.
        self.env = {"PATH": PATH, "HOME": str(TMP / "home"), "LANG": "C.UTF-8"}
        self.daemon: Process | None = None
        self.worker: Process | None = None
        #: Each start logs to a file of its own (``NAME.N.log``).
        self.starts = 0

    @property
    def url(self) -> str:
        """sioworkersd's XML-RPC URL (upstream's ``SIOWORKERSD_URL``)."""
        return f"http://127.0.0.1:{self.rpc_port}/"

    @property
    def log(self) -> str:
        """sioworkersd's log, every start of it."""
        paths = [TMP / "logs" / f"{self.name}.{n}.log" for n in range(1, self.starts + 1)]
        return "".join(path.read_text(errors="replace") for path in paths if path.exists())

    def start(self, retry_max: float = 1.0) -> Sioworkersd:
        """Start sioworkersd (again, on the same task database) and a worker; wait until the
        worker has joined."""
        self.starts += 1
        self.daemon = Process(
            f"{self.name}.{self.starts}",
            [
                self.python,
                self.twistd,
                "-n",
                "-l-",
                "--pidfile=",
                TAPNAME,
                f"--amqp-env-file={self.env_file}",
                f"--amqp-retry-max={retry_max}",
                f"--database={self.database}",
                "--rpc-listen=127.0.0.1",
                f"--rpc-port={self.rpc_port}",
                "--worker-listen=127.0.0.1",
                f"--worker-port={self.worker_port}",
            ],
            self.env,
        )
        self.daemon.wait_for_log(f"Site starting on {self.rpc_port}")
        self.worker = Process(
            f"{self.name}-worker.{self.starts}",
            [
                self.python,
                self.twistd,
                "-n",
                "-l-",
                "--pidfile=",
                "worker",
                "--concurrency=4",
                f"--name={self.name}-worker",
                f"--port={self.worker_port}",
                "127.0.0.1",
            ],
            self.env,
        )
        daemon = self.daemon
        wait_until(lambda: "New worker" in daemon.log, 30, "the worker to join sioworkersd")
        return self

    def kill(self) -> None:
        """SIGKILL sioworkersd and its worker."""
        for proc in (self.daemon, self.worker):
            if proc is not None:
                proc.kill()

    def stop(self) -> None:
        for proc in (self.worker, self.daemon):
            if proc is not None:
                proc.stop()


def statuses_on_disk(database: Path) -> dict[str, str]:
    """Each task's status in sioworkersd's task database as it last synced it to its file (every
    10 s, upstream's ``DB_SYNC_INTERVAL_IN_SEC``); empty while the file cannot be read whole."""
    import bsddb3  # filetracker's server has it in OIOIOI's environment too

    try:
        db = bsddb3.hashopen(str(database), "r")
    except bsddb3.db.DBError:
        return {}
    try:
        return {key.decode(): json.loads(db[key])["status"] for key in db}
    except (bsddb3.db.DBError, ValueError, KeyError):
        return {}
    finally:
        db.close()


def park(jobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job queued with upstream's ``delay_environ``, for a Celery worker to transfer with
    upstream's ``transfer_job`` and its sioworkers backend; ``jobs`` are its group's jobs (one
    ping job by default). Its error handlers record a step too, as its recipe does at its end."""
    from oioioi.evalmgr.tasks import create_environ, delay_environ

    env = create_environ()
    transfer = {"jobs": jobs} if jobs else {}
    env["recipe"] = [
        ("transfer", "results_e2e.recipes.transfer_to_workers", transfer),
        ("record", "results_e2e.recipes.record", {"step": "after-results"}),
    ]
    env["error_handlers"] = [
        ("record", "results_e2e.recipes.record", {"step": "error-handled"}),
        *env["error_handlers"],
    ]
    with transaction.atomic():
        delay_environ(env)
    return env


def peek(broker: Settings, queue: str) -> list[tuple[Any, bytes]]:
    """Every message of ``queue``, left in it (taken unacknowledged, given back on close)."""
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    out = []
    try:
        channel = conn.channel()
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()


def identities(env: dict[str, Any]) -> dict[Any, str]:
    """What differs between two groups of the same shape: their ids, return URL, saved environ
    (each with the name it is replaced by in :func:`normalised`)."""
    names: dict[Any, str] = {
        env["job_id"]: "<job_id>",
        env["group_id"]: "<group_id>",
        env["return_url"]: "<return_url>",
    }
    for key, job in sorted(env["workers_jobs"].items()):
        names[job["task_id"]] = f"<task_id {key}>"
    return names


def normalised(env: Any, names: dict[Any, str]) -> Any:
    """``env`` with each value of ``names`` replaced by its name, and its saved environ's id."""
    if isinstance(env, dict):
        return {
            k: "<saved_environ_id>" if k == "saved_environ_id" else normalised(v, names)
            for k, v in env.items()
        }
    if isinstance(env, list):
        return [normalised(v, names) for v in env]
    if isinstance(env, str):
        return names.get(env, env)
    return env


def results_env(broker: Settings, **extra: str) -> dict[str, str]:
    """Environment of a consumer or shim whose results broker is ``broker`` (Celery stays on the
    run's broker)."""
    return {"RESULTS_E2E_AMQP_URL": broker.amqp_url, **extra}


def group_ids(messages: list[tuple[Any, bytes]]) -> list[str]:
    return [json.loads(body)["group_id"] for _, body in messages]


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
