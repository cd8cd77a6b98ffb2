"""Where a result's time goes on the database thread, without the broker: for profiling.

Creates a database of its own (like run.py), makes waiting jobs, and pushes decoded results
through the consumer's own ``store.write`` in batches, then ``store.after_ack`` (the recipe
runs), timing both and counting the statements and commits each issues per result.

    .venv/bin/python bench/profile_write.py --db postgres --count 2000 --batch 32
    .venv/bin/python bench/profile_write.py --profile     # and a pyinstrument profile of it all
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class StatementCounter:
    """A Django execute wrapper counting statements by their first word."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        self.counts[sql.lstrip().split(None, 1)[0].upper()] += 1
        return execute(sql, params, many, context)


def measure(size: str, count: int, batch: int) -> dict[str, Any]:
    from django.db import connection

    from bench import environs
    from bench.jobs import clear_tables, create_waiting_jobs
    from consumer.decode import decode
    from oioioi.workers import store

    clear_tables()
    template = environs.template(size)
    jobs = create_waiting_jobs(template, count)
    bodies = [template.body(j.job_id, j.submission_id, j.saved_environ_id) for j in jobs]
    write_counter, run_counter = StatementCounter(), StatementCounter()
    commits = {"write": 0, "run": 0}
    write_s = run_s = decode_s = 0.0
    original_commit = connection.commit

    phase = "write"

    def counting_commit() -> None:
        commits[phase] += 1
        original_commit()

    connection.commit = counting_commit  # type: ignore[method-assign]
    try:
        for start in range(0, count, batch):
            chunk = bodies[start : start + batch]
            t0 = time.perf_counter()
            results = [decode(body, message_id) for message_id, body in chunk]
            t1 = time.perf_counter()
            phase = "write"
            with connection.execute_wrapper(write_counter):
                outcomes = store.write(results)
            t2 = time.perf_counter()
            phase = "run"
            with connection.execute_wrapper(run_counter):
                store.after_ack()
            t3 = time.perf_counter()
            assert all(o == "committed" for o in outcomes), outcomes
            decode_s += t1 - t0
            write_s += t2 - t1
            run_s += t3 - t2
    finally:
        del connection.commit
    per = 1000 / count
    return {
        "size": size,
        "batch": batch,
        "decode_ms": decode_s * per,
        "write_ms": write_s * per,
        "run_ms": run_s * per,
        "results_per_s": count / (decode_s + write_s + run_s),
        "write_statements": {k: round(v / count, 2) for k, v in write_counter.counts.items()},
        "run_statements": {k: round(v / count, 2) for k, v in run_counter.counts.items()},
        "write_commits": commits["write"] / count,
        "run_commits": commits["run"] / count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--count", type=int, default=2000, help="Results per configuration.")
    parser.add_argument("--batch", default="1,32", help="Batch sizes, comma-separated.")
    parser.add_argument("--size", default="small", help="Environ size (small, typical, large).")
    parser.add_argument("--profile", action="store_true", help="Print a pyinstrument profile.")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        help="A PostgreSQL database to connect to for creating and dropping the benchmark's own.",
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
        import django

        django.setup()
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler()
            profiler.start()
        for batch in (int(b) for b in args.batch.split(",")):
            print(measure(args.size, args.count, batch))
        if profiler is not None:
            profiler.stop()
            print(profiler.output_text(unicode=True, show_all=False))
    finally:
        from django.db import connections

        connections.close_all()
        db.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
