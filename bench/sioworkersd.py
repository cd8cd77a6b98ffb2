"""sioworkersd returning results over AMQP against over HTTP to the shim, in the same run.

    .venv/bin/python bench/sioworkersd.py                      # the README's figures (~3 minutes)
    .venv/bin/python bench/sioworkersd.py --groups 500 --repeats 1

Everything is real: ``twistd sioworkersd-amqp`` (its environment prepared as the upstream tier
prepares it: sioworkers 1.5.9 from the pinned tarball, the return path installed with
``deploy/sioworkersd/install``), ``twistd worker`` processes, the shim
(``start_receive_from_workers --http-shim``) and the local RabbitMQ, with queues of this run's own
(removed afterwards). One sioworkersd serves both return URLs; the two are measured alternately,
``--repeats`` times each, and the medians printed:

- **steady**: ``--groups`` groups of one ping job each, submitted over XML-RPC ``run_group`` by
  4 client threads as fast as sioworkersd takes them, run by the workers and returned; the rate
  is results arriving in the results queue per second, from the first to the last;
- **restart**: ``--groups`` finished results in sioworkersd's task database (status
  ``to_return``, written as sioworkersd writes them), and sioworkersd started on it: everything
  it held, returned at once; the same rate. This is the return path alone, with no worker.

A result counts when a consumer of the results queue (this script) receives it, which is after
the broker confirmed it to sioworkersd (AMQP) or to the shim, which then answered sioworkersd's
POST (HTTP). Each message's ``app_id`` says which path it took, and each run checks it.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xmlrpc.client
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika

from bench.broker import Broker, bench_settings
from bench.procs import ROOT, Proc, free_port, manage, process_env
from consumer.config import ENVIRONMENT, Settings

#: Writes finished results into a task database as sioworkersd's DBWrapper does (run with
#: sioworkersd's Python): one JSON record per group, status to_return.
FILL = r"""
import json, sys, time, bsddb3
from sio.workers.util import json_dumps
path, url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = bsddb3.hashopen(path)
for i in range(count):
    gid = "GROUP_urn:uuid:bench-%s-%d" % (sys.argv[4], i)
    job = {"job_type": "ping", "ping": str(i), "group_id": gid, "task_id": "urn:uuid:t-%d" % i}
    env = {"workers_jobs": {"job0": job}, "return_url": url, "job_id": "bench-%d" % i,
           "group_id": gid, "workers_jobs.results": {"job0": dict(job, pong=str(i), result="SUCCESS")}}
    db[gid.encode()] = json_dumps({"id": gid, "env": env, "status": "to_return",
                                   "timestamp": time.time(), "retry_cnt": 0}).encode()
db.sync()
db.close()
"""


def load_tier() -> Any:
    """``tests/upstream/run`` as a module: it builds sioworkersd's environment."""
    path = ROOT / "tests" / "upstream" / "run"
    loader = importlib.machinery.SourceFileLoader("upstream_tier", str(path))
    spec = importlib.util.spec_from_loader("upstream_tier", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class Sioworkersd:
    def __init__(
        self,
        env: dict[str, str],
        settings: Settings,
        work: Path,
        workers: int,
        slots: int,
        connections: int,
    ):
        self.connections = connections
        self.python = env["RESULTS_E2E_SIOWORKERSD_PYTHON"]
        self.twistd = env["RESULTS_E2E_TWISTD"]
        self.work = work
        self.workers = workers
        self.slots = slots
        self.rpc_port = free_port()
        self.worker_port = free_port()
        self.database = work / "sioworkersd.db"
        self.env_file = work / "amqp.env"
        values = {var: getattr(settings, field) for var, (field, _) in ENVIRONMENT.items()}
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.env_file.chmod(0o600)
        self.procs: list[Proc] = []

    def start(self, with_workers: bool = True) -> None:
        daemon = Proc(
            "sioworkersd",
            [
                self.python,
                self.twistd,
                "-n",
                "-l-",
                "--pidfile=",
                "sioworkersd-amqp",
                f"--amqp-env-file={self.env_file}",
                f"--amqp-connections={self.connections}",
                f"--database={self.database}",
                "--rpc-listen=127.0.0.1",
                f"--rpc-port={self.rpc_port}",
                "--worker-listen=127.0.0.1",
                f"--worker-port={self.worker_port}",
            ],
            {"PATH": "/usr/bin:/bin", "HOME": str(self.work)},
            self.work,
        )
        self.procs = [daemon]
        daemon.wait_for_log(f"Site starting on {self.rpc_port}")
        if not with_workers:
            return
        for n in range(self.workers):
            self.procs.append(
                Proc(
                    f"worker{n}",
                    [
                        self.python,
                        self.twistd,
                        "-n",
                        "-l-",
                        "--pidfile=",
                        "worker",
                        f"--concurrency={self.slots}",
                        f"--name=bench-worker-{n}",
                        f"--port={self.worker_port}",
                        "127.0.0.1",
                    ],
                    {"PATH": "/usr/bin:/bin", "HOME": str(self.work)},
                    self.work,
                )
            )
        deadline = time.monotonic() + 60
        while daemon.log_path.read_text(errors="replace").count("New worker") < self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not join:\n{daemon.tail()}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """CPU time sioworkersd has used so far, all its threads."""
        fields = Path(f"/proc/{self.procs[0].pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs = []

    def fill(self, url: str, count: int) -> None:
        subprocess.run(
            [self.python, "-c", FILL, str(self.database), url, str(count), uuid.uuid4().hex[:8]],
            check=True,
        )

    def submit(self, url: str, count: int, threads: int = 4) -> None:
        def client(share: range) -> None:
            server = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.rpc_port}/")
            for i in share:
                env = {
                    "workers_jobs": {"job0": {"job_type": "ping", "ping": str(i)}},
                    "return_url": url,
                    "job_id": f"bench-{i}",
                }
                server.run_group(json.dumps(env))

        workers = [
            threading.Thread(target=client, args=(range(k, count, threads),), daemon=True)
            for k in range(threads)
        ]
        for worker in workers:
            worker.start()


class Arrivals:
    """A consumer of the results queue, subscribed before the results are sent: when each one
    arrives, and which path it took (``app_id``)."""

    def __init__(self, settings: Settings) -> None:
        self._conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        channel = self._conn.channel()
        channel.queue_purge(settings.queue)
        channel.basic_qos(prefetch_count=1000)
        self.times: list[float] = []
        self.sources: set[str] = set()
        channel.basic_consume(settings.queue, self._take, auto_ack=True)

    def _take(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.times.append(time.monotonic())
        self.sources.add(props.app_id)

    def wait(self, count: int, timeout: float = 600.0) -> list[float]:
        deadline = time.monotonic() + timeout
        while len(self.times) < count and time.monotonic() < deadline:
            self._conn.process_data_events(time_limit=0.05)
        self._conn.close()
        if len(self.times) != count:
            raise RuntimeError(f"{len(self.times)} of {count} results arrived")
        return self.times


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2000, help="results per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per path and mode")
    parser.add_argument("--workers", type=int, default=2, help="twistd worker processes")
    parser.add_argument("--concurrency", type=int, default=8, help="slots per worker")
    parser.add_argument(
        "--connections", type=int, default=4, help="sioworkersd's --amqp-connections"
    )
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()

    settings = bench_settings(args.amqp_url)
    work = Path(tempfile.mkdtemp(prefix="bench-sioworkersd-"))
    started = time.monotonic()
    print("preparing sioworkersd's environment (as the upstream tier does)...", file=sys.stderr)
    env = load_tier().sioworkersd_env(work)
    broker = Broker(settings)  # declares this run's queues
    shim_port = free_port()
    shim = Proc(
        "shim",
        manage("start_receive_from_workers", "--http-shim", "--port", str(shim_port)),
        process_env(settings, f"sqlite:///{work}/unused.sqlite3", LOG_LEVEL="WARNING"),
        work,
    )
    sioworkersd = Sioworkersd(env, settings, work, args.workers, args.concurrency, args.connections)
    paths = {
        "amqp": ("amqp:", "sioworkersd"),
        "http": (f"http://127.0.0.1:{shim_port}/", "oioioi-http-shim"),
    }
    results: dict[tuple[str, str], list[float]] = {}
    try:
        shim.wait_for_port(shim_port)
        for repeat in range(args.repeats):
            for name, (url, app_id) in paths.items():
                # steady: submitted groups, run by the workers, returned
                sioworkersd.database.unlink(missing_ok=True)
                sioworkersd.start()
                arrived = Arrivals(settings)
                cpu = sioworkersd.cpu_seconds()
                sioworkersd.submit(url, args.groups)
                results.setdefault(("steady", name), []).append(rate(arrived.wait(args.groups)))
                assert arrived.sources == {app_id}, arrived.sources
                cpu_ms = 1000 * (sioworkersd.cpu_seconds() - cpu) / args.groups
                results.setdefault(("cpu", name), []).append(cpu_ms)
                sioworkersd.stop()
                # restart: what the task database holds, returned at start
                sioworkersd.database.unlink(missing_ok=True)
                sioworkersd.fill(url, args.groups)
                arrived = Arrivals(settings)
                sioworkersd.start(with_workers=False)
                results.setdefault(("restart", name), []).append(rate(arrived.wait(args.groups)))
                assert arrived.sources == {app_id}, arrived.sources
                sioworkersd.stop()
                print(
                    f"  repeat {repeat + 1} {name}: steady {results['steady', name][-1]:.0f}/s "
                    f"({results['cpu', name][-1]:.2f} ms of sioworkersd's CPU per result), "
                    f"restart {results['restart', name][-1]:.0f}/s",
                    file=sys.stderr,
                )
    finally:
        sioworkersd.stop()
        shim.stop()
        with_queues = [settings.queue, settings.retry_queue, settings.dead_letter_queue]
        conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        channel = conn.channel()
        for queue in with_queues:
            channel.queue_delete(queue)
        channel.exchange_delete(settings.exchange)
        conn.close()
        broker.close()
    shutil.rmtree(work, ignore_errors=True)  # kept, with every process's log, if a run failed
    print(
        f"\nsioworkersd 1.5.9 returning {args.groups} ping results, {args.repeats} runs each "
        f"(median; all runs), {args.workers} workers x {args.concurrency} slots, "
        f"{args.connections} broker connections, "
        f"{time.monotonic() - started:.0f} s in all\n"
    )
    print("| measure | over AMQP | over HTTP to the shim | AMQP / HTTP |")
    print("| --- | ---: | ---: | ---: |")
    rows = {
        "steady": ("steady: results/s", "{:,.0f}"),
        "cpu": ("steady: sioworkersd's CPU ms per result", "{:.2f}"),
        "restart": ("restart: results/s", "{:,.0f}"),
    }
    for key, (label, fmt) in rows.items():
        amqp, http = results[key, "amqp"], results[key, "http"]
        amqp_runs = ", ".join(fmt.format(x) for x in amqp)
        http_runs = ", ".join(fmt.format(x) for x in http)
        print(
            f"| {label} | {fmt.format(statistics.median(amqp))} ({amqp_runs}) | "
            f"{fmt.format(statistics.median(http))} ({http_runs}) | "
            f"{statistics.median(amqp) / statistics.median(http):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
