"""Where one result's time goes, step by step, from its delivery to the end of its recipe.

Creates a database of its own (like run.py) and queues of its own on the local RabbitMQ, makes
waiting jobs of one environ size, publishes their results, and takes them through the consumer's
own code as ``start_receive_from_workers`` does, in its batches: the delivery
(``Transport.receive``), the decode and check, the write (``store.write``: inbox, resume, merge,
hand-off, commit) and the recipe (``store.after_ack``: the runner's rounds, checkpoints, commit).
Each statement is timed and put under its step by the table it touches; JSON parsing and
serialising are counted and timed wherever they happen (the standard library's and orjson's), as
are the cyclic garbage collector's pauses; what is left of a stage is its Python.

    .venv/bin/python bench/profile_path.py --size typical --count 400
    .venv/bin/python bench/profile_path.py --size large --count 64 --db sqlite
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Statements by the table they touch: the step they belong to.
_TABLE_STEPS = {
    "workers_receivedresult": "inbox",
    "evalmgr_savedenviron": "saved environ",
    "evalmgr_queuedjob": "job state",
    "workers_pendingrun": "pending run",
}
_TABLE = re.compile(r'(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', re.I)


class Clock:
    """Time and counts per (stage, step); a stage is what the consumer does at one point."""

    def __init__(self) -> None:
        self.stage = "setup"
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self._gc_started = 0.0

    def add(self, step: str, seconds: float, size: int = 0) -> None:
        key = (self.stage, step)
        self.seconds[key] += seconds
        self.counts[key] += 1
        self.bytes[key] += size

    @contextmanager
    def staged(self, stage: str) -> Iterator[None]:
        self.stage = stage
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add("total", time.perf_counter() - started)
            self.stage = "setup"

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.add("garbage collector", time.perf_counter() - self._gc_started)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | bytearray | memoryview) else 0


def _timed(clock: Clock, step: str, func: Callable[..., Any], sized: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = func(*args, **kwargs)
        size = _size(args[0] if sized == "in" and args else out)
        clock.add(step, time.perf_counter() - started, size)
        return out

    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapper


def instrument(clock: Clock) -> None:
    """Wrap the JSON functions and the recipe phase, and watch the garbage collector."""
    json.loads = _timed(clock, "parse JSON", json.loads, "in")
    json.dumps = _timed(clock, "serialise JSON", json.dumps, "out")
    try:
        import orjson
    except ImportError:
        pass
    else:
        orjson.loads = _timed(clock, "parse JSON", orjson.loads, "in")
        orjson.dumps = _timed(clock, "serialise JSON", orjson.dumps, "out")
    from consumer import environ
    from oioioi.workers import dispatch, runner, sql

    runner.run_phase = _timed(clock, "recipe phase", runner.run_phase, "")
    if hasattr(environ, "loads"):
        environ.loads = _timed(clock, "parse JSON", environ.loads, "in")
        for module in (runner, dispatch):
            module.loads = environ.loads  # type: ignore[attr-defined]
        environ.parse = _timed(clock, "scan JSON (top level)", environ.parse, "in")
        environ.RawEnviron.to_json = _timed(  # type: ignore[method-assign]
            clock, "join JSON", environ.RawEnviron.to_json, "out"
        )
    if hasattr(sql, "copy_rows"):
        # COPY is no statement Django's execute wrappers see.
        original = sql.copy_rows

        def copy_rows(model: Any, names: Any, rows: Any) -> None:
            started = time.perf_counter()
            original(model, names, rows)
            table = _TABLE_STEPS.get(model._meta.db_table, "other")
            size = sum(_size(v) for row in rows for v in row)
            clock.add(f"SQL {table}: COPY", time.perf_counter() - started, size)

        sql.copy_rows = copy_rows
    gc.callbacks.append(clock.on_gc)


class Statements:
    """A Django execute wrapper: each statement timed under its table's step, and the commits."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            verb = sql.lstrip().split(None, 1)[0].upper()
            m = _TABLE.search(sql)
            table = _TABLE_STEPS.get(m.group(1) if m else "", "other")
            size = sum(_size(p) for p in params or ()) if not many else 0
            self.clock.add(f"SQL {table}: {verb}", time.perf_counter() - started, size)


def publish(amqp_url: str, queue: str, bodies: list[tuple[str, bytes]]) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for message_id, body in bodies:
            ch.basic_publish(
                "",
                queue,
                body,
                pika.BasicProperties(message_id=message_id, delivery_mode=2),
                mandatory=True,
            )
    finally:
        conn.close()


def fill_batch(transport: Any, settings: Any, left: int) -> list[Any]:
    """A full batch, as the consumer has it after servicing the connection during the write
    before: up to the batch's count and bytes, or what is left."""
    batch: list[Any] = []
    size = 0
    while len(batch) < min(left, settings.batch_size):
        room = settings.batch_bytes - size
        if batch and room < len(batch[-1].body):
            break
        # A short wait once the batch has begun: what the prefetch lets in is there already.
        wait = 0.05 if batch else 1.0
        got = transport.receive(min(left, settings.batch_size) - len(batch), wait, room)
        if batch and not got:
            break  # the prefetch holds no more than this (large results)
        batch.extend(got)
        size += sum(len(d.body) for d in got)
    return batch


def measure(size: str, count: int, amqp_url: str) -> tuple[Clock, dict[str, Any]]:
    from django.db import connection

    from bench import environs
    from bench.broker import Broker, bench_settings
    from bench.jobs import clear_tables, create_waiting_jobs
    from consumer.decode import decode
    from consumer.transport import Transport
    from oioioi.workers.conf import consumer_settings
    from oioioi.workers.store import build as build_store

    clear_tables()
    template = environs.template(size)
    jobs = create_waiting_jobs(template, count)
    bodies = [template.body(j.job_id, j.submission_id, j.saved_environ_id) for j in jobs]
    names = bench_settings(amqp_url, f"profile{uuid.uuid4().hex[:8]}")
    settings = consumer_settings(
        amqp_url=amqp_url,
        exchange=names.exchange,
        queue=names.queue,
        dead_letter_queue=names.dead_letter_queue,
        retry_queue=names.retry_queue,
    )
    clock = Clock()
    statements = Statements(clock)
    original_commit = connection.commit

    def timed_commit() -> None:
        started = time.perf_counter()
        original_commit()
        clock.add("commit", time.perf_counter() - started)

    batches = 0
    broker = Broker(settings)  # declares the queues
    publish(amqp_url, settings.queue, bodies)
    broker.wait_depth(count)
    with Transport(settings) as transport:
        connection.commit = timed_commit  # type: ignore[method-assign]
        instrument(clock)
        store = build_store()
        try:
            done = 0
            while done < count:
                with clock.staged("deliver"):
                    deliveries = fill_batch(transport, settings, count - done)
                with clock.staged("decode and check"):
                    results = []
                    for d in deliveries:
                        result = decode(d.body, d.message_id)
                        if store.check is not None:
                            store.check(result.env)
                        results.append(result)
                with clock.staged("write"), connection.execute_wrapper(statements):
                    outcomes = store.write(results)
                with clock.staged("ack"):
                    transport.ack(deliveries[-1], multiple=True)
                with clock.staged("recipe"), connection.execute_wrapper(statements):
                    store.after_ack()
                assert all(o == "committed" for o in outcomes), outcomes
                done += len(deliveries)
                batches += 1
        finally:
            del connection.commit
            gc.callbacks.remove(clock.on_gc)
            broker.delete_everything()
            broker.close()
    info = {
        "size": size,
        "body_bytes": len(bodies[0][1]),
        "count": count,
        "batches": batches,
        "database": connection.vendor,
    }
    return clock, info


def report(clock: Clock, info: dict[str, Any]) -> str:
    count = info["count"]
    stages = ["deliver", "decode and check", "write", "ack", "recipe"]
    lines = [
        f"{info['size']} environ ({info['body_bytes'] / 1024:,.0f} KB), {count} results in "
        f"{info['batches']} batches, {info['database']}: per result",
        "",
        "| stage | step | ms per result | calls per result | KB per call |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    grand = 0.0
    for stage in stages:
        total = clock.seconds.get((stage, "total"), 0.0)
        grand += total
        accounted = 0.0
        steps = sorted(
            (step for (s, step) in clock.seconds if s == stage and step != "total"),
            key=lambda step: -clock.seconds[(stage, step)],
        )
        for step in steps:
            seconds = clock.seconds[(stage, step)]
            calls = clock.counts[(stage, step)]
            size = clock.bytes[(stage, step)]
            # The phase and the JSON functions run inside statements of nobody; the statements
            # and commits are disjoint from them. The collector may pause inside any of them.
            if step != "garbage collector":
                accounted += seconds
            per_call = f"{size / calls / 1024:,.1f}" if size and calls else ""
            lines.append(
                f"| {stage} | {step} | {1000 * seconds / count:.3f} | {calls / count:.2f} "
                f"| {per_call} |"
            )
        lines.append(
            f"| {stage} | Python (the rest) | {1000 * max(0.0, total - accounted) / count:.3f} | | |"
        )
        lines.append(f"| **{stage}** | **all** | **{1000 * total / count:.3f}** | | |")
    lines.append(f"| **all** | | **{1000 * grand / count:.3f}** ({count / grand:,.0f}/s) | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--size", default="typical", help="Environ size (small, typical, large).")
    parser.add_argument("--count", type=int, default=400, help="Results to take through.")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        help="A PostgreSQL database to connect to for creating and dropping the benchmark's own.",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        help="The broker (queues of the profile's own are declared and deleted there).",
    )
    args = parser.parse_args()

    from bench.run import Database

    tmp = Path(tempfile.mkdtemp(prefix="oioioi-profile-"))
    db = Database(args.db, args.pg_url, tmp)
    db.create()
    try:
        os.environ["DATABASE_URL"] = db.url
        os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
        os.environ.setdefault("LOG_LEVEL", "WARNING")
        os.environ.setdefault("EVALMGR_DISPATCHER", "oioioi.workers.dispatch.LocalDispatcher")
        import django

        django.setup()
        clock, info = measure(args.size, args.count, args.amqp_url)
        print(report(clock, info))
    finally:
        from django.db import connections

        connections.close_all()
        db.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
