"""The measurements for one database, in a process configured for it (``run.py`` starts this).

Run alone: ``DJANGO_SETTINGS_MODULE=bench.settings DATABASE_URL=... python -m bench.suite
--plan plan.json --out results.json``; the database must be migrated.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import environs
from bench.broker import Broker, bench_settings, celery_queue
from bench.http_load import run_load, sioworkersd_request
from bench.procs import OutcomeTail, Proc, free_port, manage, process_env
from bench.stats import percentile

log = logging.getLogger("bench")

#: Requests (or messages) sent before each measured HTTP run, not counted: connections, imports.
WARMUP = 5
#: An offered rate is sustained when p99 publish-to-commit stays under this (seconds): a backlog
#: that grows for a whole step pushes the last messages' latency far past it.
SUSTAINED_P99 = 0.25


@dataclass
class Plan:
    """How much to measure; ``run.py`` has the quick and full presets."""

    sections: list[str]
    sizes: list[str]
    repeats: int
    clients: list[int]
    http_counts: dict[str, int]
    drain_counts: dict[str, int]
    e2e_rate: float
    e2e_seconds: float
    step_seconds: float
    max_steps: int
    memory_count: int
    #: Longest the long drain may take, in seconds.
    memory_seconds: float
    #: Large environs in the drain that measures the consumer's peak memory.
    memory_large_count: int
    amqp_url: str
    log_dir: str
    database_url: str
    queue_prefix: str


@dataclass
class Results:
    db: str
    body_bytes: dict[str, int] = field(default_factory=dict)
    legacy: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    shim: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    drain: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    handoff: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    e2e: list[dict[str, Any]] = field(default_factory=list)
    max_rate: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    memory_large: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Suite:
    def __init__(self, plan: Plan) -> None:
        from django.db import connection

        self.plan = plan
        self.settings = bench_settings(plan.amqp_url, plan.queue_prefix)
        self.broker = Broker(self.settings)
        self.log_dir = Path(plan.log_dir)
        self.results = Results(db=connection.vendor)
        sizes = set(plan.sizes) | ({"large"} if "memory-large" in plan.sections else set())
        self.templates = {size: environs.template(size) for size in sizes}
        self.results.body_bytes = {
            size: len(t.body("urn:uuid:" + "0" * 32, 1, 1)[1]) for size, t in self.templates.items()
        }

    def env(self, **extra: str) -> dict[str, str]:
        return process_env(self.settings, self.plan.database_url, **extra)

    # --- the sections -----------------------------------------------------------------------

    def run(self, out: Path | None = None) -> Results:
        """Run the plan's sections; with ``out``, the figures so far are written there after
        each section, so a run stopped by its time limit still reports what it measured."""
        sections: dict[str, Callable[[], None]] = {
            "legacy": self.legacy,
            "shim": self.shim,
            "drain": self.drain,
            "handoff": self.handoff,
            "e2e": self.e2e,
            "memory": self.memory,
            "memory-large": self.memory_large,
        }
        try:
            for name in self.plan.sections:
                started = time.monotonic()
                log.info("== %s on %s", name, self.results.db)
                self._guard(name, sections[name])
                log.info("   %s took %.0f s", name, time.monotonic() - started)
                if out is not None:
                    out.write_text(json.dumps(asdict(self.results), indent=1))
        finally:
            self.broker.delete_everything([celery_queue(self.settings)])
            self.broker.close()
        return self.results

    def _guard(self, what: str, func: Callable[[], None]) -> None:
        try:
            func()
        except Exception as e:
            log.error("%s failed: %s", what, e)
            self.results.errors.append(f"{what}: {type(e).__name__}: {e}")
            log.debug("%s", traceback.format_exc())

    def legacy(self) -> None:
        port = free_port()
        proc = Proc(
            "legacy",
            [sys.executable, "-m", "bench.legacy_receiver", "--port", str(port)],
            self.env(
                # The stand-in's delay_environ publishes evalmgr_job with Celery, as upstream's
                # does, to a queue of the benchmark's own; nothing consumes it.
                CELERY_ALWAYS_EAGER="0",
                CELERY_BROKER_URL=self.settings.amqp_url,
                EVALMGR_CELERY_QUEUE=celery_queue(self.settings),
            ),
            self.log_dir,
        )
        try:
            proc.wait_for_port(port)
            self._http(self.results.legacy, port, proc, with_jobs=True)
        finally:
            proc.stop()
            self.broker.purge(celery_queue(self.settings))

    def shim(self) -> None:
        port = free_port()
        proc = Proc(
            "shim",
            manage("start_receive_from_workers", "--http-shim", "--port", str(port)),
            self.env(),
            self.log_dir,
        )
        try:
            proc.wait_for_port(port)
            self._http(self.results.shim, port, proc, with_jobs=False)
        finally:
            proc.stop()
            self.broker.purge()

    def _http(
        self,
        into: dict[str, dict[str, list[dict[str, Any]]]],
        port: int,
        proc: Proc,
        with_jobs: bool,
    ) -> None:
        from bench.jobs import clear_tables, create_waiting_jobs
        from oioioi.evalmgr.models import QueuedJob

        for size in self.plan.sizes:
            template = self.templates[size]
            for clients in self.plan.clients:
                runs = into.setdefault(size, {}).setdefault(str(clients), [])
                for _ in range(self.plan.repeats):
                    n = self.plan.http_counts[size]
                    clear_tables()
                    self.broker.purge()
                    if with_jobs:
                        jobs = [
                            (j.job_id, j.submission_id, j.saved_environ_id)
                            for j in create_waiting_jobs(template, n + WARMUP)
                        ]
                    else:
                        jobs = [(uuid.uuid4().urn, i, i) for i in range(1, n + WARMUP + 1)]
                    requests = [
                        sioworkersd_request(template.body(*job)[1], "127.0.0.1", port)
                        for job in jobs
                    ]
                    run_load("127.0.0.1", port, requests[:WARMUP], 1)
                    summary = run_load("127.0.0.1", port, requests[WARMUP:], clients).summary()
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
                    if with_jobs:
                        summary["resumed"] = QueuedJob.objects.filter(state="QUEUED").count()
                    else:
                        summary["queued"] = self.broker.depth()
                    runs.append(summary)
                    log.info("   %s %s x%d: %s", proc.name, size, clients, _brief(summary))

    def _start_consumer(self, *args: str, **env: str) -> tuple[Proc, OutcomeTail]:
        proc = Proc(
            "consumer",
            manage("start_receive_from_workers", *args),
            self.env(**env),
            self.log_dir,
        )
        proc.wait_for_log("Consuming from")
        return proc, OutcomeTail(proc.log_path)

    def _messages(self, size: str, count: int) -> list[tuple[str, bytes]]:
        from bench.jobs import create_waiting_jobs

        template = self.templates[size]
        jobs = create_waiting_jobs(template, count)
        out = []
        for job in jobs:
            group_id, body = template.body(job.job_id, job.submission_id, job.saved_environ_id)
            out.append((group_id, body))
        return out

    def _check_settled(
        self, count: int, proc: Proc, timeout: float = 120.0, recipes: bool = True
    ) -> float:
        """Wait until every message is acked and (with ``recipes``) every recipe ran; returns
        when that was."""
        from oioioi.evalmgr.models import QueuedJob
        from oioioi.workers.models import PendingRun, ReceivedResult

        def busy() -> bool:
            if self.broker.depth():
                return True
            if recipes:
                return PendingRun.objects.exists() or QueuedJob.objects.exists()
            return PendingRun.objects.count() < count

        deadline = time.monotonic() + timeout
        while busy():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not settled: queue {self.broker.depth()}, pending runs "
                    f"{PendingRun.objects.count()}, jobs {QueuedJob.objects.count()}:\n{proc.tail()}"
                )
            time.sleep(0.05)
        done = time.time()
        resumed = ReceivedResult.objects.filter(outcome="resumed").count()
        dead = self.broker.depth(self.settings.dead_letter_queue)
        if resumed != count or dead:
            raise RuntimeError(f"{resumed} of {count} resumed, {dead} dead-lettered")
        return done

    def drain(self) -> None:
        self._drain(self.results.drain, recipes=True)

    def handoff(self) -> None:
        """The drain again with the recipes left to another process: the write path alone."""
        self._drain(self.results.handoff, recipes=False)

    def _drain(self, into: dict[str, list[dict[str, Any]]], recipes: bool) -> None:
        from bench.jobs import clear_tables

        env = {} if recipes else {"EVALMGR_DISPATCHER": "bench.handoff.HandOffOnly"}
        for size in self.plan.sizes:
            runs = into.setdefault(size, [])
            n = self.plan.drain_counts[size]
            for _ in range(self.plan.repeats):
                clear_tables()
                self.broker.purge()
                messages = self._messages(size, n)
                self.broker.fill(messages, n)
                proc, tail = self._start_consumer(**env)
                try:
                    tail.wait(n, proc, timeout=max(120.0, n / 20))
                    done = self._check_settled(n, proc, recipes=recipes)
                finally:
                    proc.stop()
                times = sorted(t for t, outcome in tail.outcomes.values() if outcome == "committed")
                lo, hi = times[int(0.05 * (n - 1))], times[int(0.95 * (n - 1))]
                steady = (int(0.95 * (n - 1)) - int(0.05 * (n - 1))) / (hi - lo) if hi > lo else 0
                summary = {
                    "messages": n,
                    "rate": steady,
                    "first_to_last_rate": (n - 1) / (times[-1] - times[0])
                    if times[-1] > times[0]
                    else 0,
                    "settled_after_last_commit_s": done - times[-1],
                }
                runs.append(summary)
                log.info(
                    "   drain%s %s: %s", "" if recipes else " (hand-off)", size, _brief(summary)
                )

    def _offered(
        self, proc: Proc, tail: OutcomeTail, rate: float, seconds: float
    ) -> dict[str, Any]:
        from bench.jobs import clear_tables

        clear_tables()
        count = max(10, int(rate * seconds))
        messages = self._messages("small", count)
        before = tail.poll()
        sent, achieved = self.broker.paced(messages, rate)
        tail.wait(before + count, proc, timeout=60 + count / 50)
        latencies = sorted(tail.outcomes[key][0] - sent[key] for key, _ in messages)
        self._check_settled(count, proc)
        return {
            "offered": rate,
            "achieved": achieved,
            "messages": count,
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "max_ms": 1000 * latencies[-1],
        }

    def e2e(self) -> None:
        proc, tail = self._start_consumer()
        try:
            for _ in range(self.plan.repeats):
                summary = self._offered(proc, tail, self.plan.e2e_rate, self.plan.e2e_seconds)
                self.results.e2e.append(summary)
                log.info("   e2e: %s", _brief(summary))
            self._guard("max rate", lambda: self._max_rate(proc, tail))
        finally:
            proc.stop()

    def _max_rate(self, proc: Proc, tail: OutcomeTail) -> None:
        """Search the highest offered rate the consumer keeps up with.

        Starts near the drain rate measured before (or the e2e rate), goes up by a quarter while
        the steps are sustained and down by a third while they are not, then bisects between the
        best sustained and the lowest unsustained rate until they are within 15%.
        """
        steps: list[dict[str, Any]] = []
        good, bad = 0.0, math.inf
        drained = [r["rate"] for r in self.results.drain.get("small", []) if r.get("rate")]
        rate = 0.8 * sorted(drained)[len(drained) // 2] if drained else self.plan.e2e_rate
        for i in range(self.plan.max_steps):
            step = self._offered(proc, tail, rate, self.plan.step_seconds)
            step["sustained"] = step["p99_ms"] / 1000 < SUSTAINED_P99
            step["publisher_bound"] = step["achieved"] < 0.95 * rate
            steps.append(step)
            log.info("   step %d: %s", i, _brief(step))
            if step["sustained"]:
                good = max(good, step["achieved"])
                if step["publisher_bound"]:
                    break
            else:
                bad = min(bad, rate)
            if good and bad < math.inf:
                if bad / good < 1.15:
                    break
                rate = (good * bad) ** 0.5
            elif good:
                rate *= 1.25
            else:
                rate /= 1.5
        self.results.max_rate = {
            "rate": good,
            "publisher_bound": any(s["publisher_bound"] and s["sustained"] for s in steps),
            "never_fell_behind": bad == math.inf,
            "steps": steps,
        }

    def memory(self) -> None:
        from bench.jobs import clear_tables

        n = self.plan.memory_count
        first = n // 10
        capped = False
        clear_tables()
        self.broker.purge()
        self.broker.fill(self._messages("small", n), n)
        proc, tail = self._start_consumer()
        samples: list[tuple[int, int, int]] = []
        at_first = None
        try:
            # Bounded in time as well as in count: on a slow or busy machine the drain stops at
            # the time limit and reports how far it got.
            deadline = time.monotonic() + self.plan.memory_seconds
            while tail.poll() < n:
                if not proc.alive():
                    signals = [
                        line for line in proc.tail(200_000).splitlines() if "received" in line
                    ]
                    raise RuntimeError(
                        f"consumer exited ({proc.proc.returncode}) at {tail.committed} of {n}; "
                        f"signals: {signals or 'none logged'}\n{proc.tail()}"
                    )
                if time.monotonic() > deadline:
                    capped = True
                    break
                rss, hwm = proc.rss()
                samples.append((tail.committed, rss, hwm))
                if at_first is None and tail.committed >= first:
                    at_first = (tail.committed, rss, hwm)
                time.sleep(0.25)
            rss, hwm = proc.rss()
            samples.append((tail.committed, rss, hwm))
            if not capped:
                self._check_settled(n, proc, timeout=300)
        finally:
            proc.stop()
        if at_first is None:
            raise RuntimeError("the drain ended before the first sample point")
        self.results.memory = {
            "messages": tail.committed,
            "planned": n,
            "time_capped": capped,
            "first_at": at_first[0],
            "rss_first_kib": at_first[1],
            "hwm_first_kib": at_first[2],
            "rss_end_kib": rss,
            "hwm_end_kib": hwm,
            "growth": hwm / at_first[2] - 1,
            "samples": samples[:: max(1, len(samples) // 50)],
        }
        log.info("   memory: %s", _brief(self.results.memory))


    def memory_large(self) -> None:
        """The consumer's peak memory against its size at rest, while it drains large environs.

        It starts on an empty queue (its size at rest is read then), and the results arrive as
        fast as the broker takes them, so that it holds as many as its prefetch lets it.
        """
        from bench.jobs import clear_tables
        from oioioi.workers.conf import consumer_settings

        n = self.plan.memory_large_count
        clear_tables()
        self.broker.purge()
        messages = self._messages("large", n)
        proc, tail = self._start_consumer()
        try:
            time.sleep(2.0)  # its first sweep and the connection settle
            idle = 0
            for _ in range(5):
                idle = max(idle, proc.rss()[0])
                time.sleep(0.1)
            self.broker.publish_all(messages)
            tail.wait(n, proc, timeout=max(120.0, n / 5))
            self._check_settled(n, proc, timeout=300)
            rss, hwm = proc.rss()
        finally:
            proc.stop()
        budget = consumer_settings().batch_bytes
        self.results.memory_large = {
            "messages": n,
            "body_bytes": self.results.body_bytes["large"],
            "idle_kib": idle,
            "hwm_kib": hwm,
            "rss_end_kib": rss,
            "batch_bytes": budget,
            "growth_kib": hwm - idle,
        }
        log.info("   memory (large): %s", _brief(self.results.memory_large))


def _brief(summary: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in summary.items()
        if not isinstance(v, list | dict)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark sections for one database.")
    parser.add_argument("--plan", required=True, help="JSON file with the plan (see Plan).")
    parser.add_argument("--out", required=True, help="Where to write the results as JSON.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pika").setLevel(logging.WARNING)
    import django

    django.setup()
    plan = Plan(**json.loads(Path(args.plan).read_text()))
    out = Path(args.out)
    results = Suite(plan).run(out)
    out.write_text(json.dumps(asdict(results), indent=1))


if __name__ == "__main__":
    main()
