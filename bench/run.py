"""Benchmark: the legacy HTTP receiver against the shim and the consumer, on PostgreSQL and SQLite.

    .venv/bin/python bench/run.py            # quick: a few minutes, for a first look
    .venv/bin/python bench/run.py --full     # what the README's figures come from (under 30 min)

Everything is set up here and removed afterwards: a database of its own on the local PostgreSQL
(``bench_<random>``, created, migrated with ``manage.py migrate``, dropped) and an SQLite file in a
temporary folder; queues of its own on the local RabbitMQ (``bench<random>.*``, deleted). Each
configuration runs ``--repeats`` times and the tables show medians. All traffic is on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pika  # noqa: E402

from bench.stats import median  # noqa: E402
from bench.suite import Plan  # noqa: E402

SECTIONS = ["legacy", "shim", "drain", "handoff", "e2e", "memory", "memory-large"]
SIZES = ["small", "typical", "large"]

#: How much each run measures. ``memory_count``, ``memory_seconds`` and ``timeout`` are per
#: database; the full run's long drain is 100,000 messages on each, and the whole run stays well
#: under 30 minutes on a small machine.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "repeats": 2,
        "http_counts": {"small": 300, "typical": 40, "large": 6},
        "drain_counts": {"small": 2000, "typical": 160, "large": 24},
        "e2e_seconds": 4.0,
        "step_seconds": 2.0,
        "max_steps": 5,
        "memory_count": {"postgres": 20_000, "sqlite": 10_000},
        "memory_seconds": {"postgres": 180, "sqlite": 120},
        "memory_large_count": 60,
        "timeout": {"postgres": 900, "sqlite": 900},
    },
    "full": {
        "repeats": 3,
        "http_counts": {"small": 1000, "typical": 150, "large": 30},
        "drain_counts": {"small": 5000, "typical": 400, "large": 60},
        "e2e_seconds": 8.0,
        "step_seconds": 3.0,
        "max_steps": 6,
        "memory_count": {"postgres": 100_000, "sqlite": 100_000},
        "memory_seconds": {"postgres": 900, "sqlite": 600},
        "memory_large_count": 200,
        "timeout": {"postgres": 1800, "sqlite": 1500},
    },
}

TARGETS = {
    "drain_vs_legacy": 4.0,
    "shim_vs_legacy": 3.0,
    "shim_p99_ms": 25.0,
    "e2e_p99_ms": 50.0,
    "rss_growth": 0.10,
}


# --- databases ---------------------------------------------------------------------------------


def _pg_admin(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


class Database:
    """A database of this run's own; ``url`` is what the processes get as DATABASE_URL."""

    def __init__(self, kind: str, pg_url: str, tmp: Path) -> None:
        self.kind = kind
        self._pg_url = pg_url
        if kind == "postgres":
            self.name = f"bench_{uuid.uuid4().hex[:10]}"
            base = pg_url.rsplit("/", 1)[0]
            self.url = f"{base}/{self.name}"
        else:
            self.name = str(tmp / "bench.sqlite3")
            self.url = f"sqlite:///{self.name}"

    def create(self) -> None:
        if self.kind == "postgres":
            _pg_admin(self._pg_url, f'CREATE DATABASE "{self.name}"')
        env = dict(os.environ, DATABASE_URL=self.url, DJANGO_SETTINGS_MODULE="bench.settings")
        subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), "migrate", "--no-input", "-v", "0"],
            cwd=ROOT,
            env=env,
            check=True,
        )

    def drop(self) -> None:
        if self.kind == "postgres":
            try:
                _pg_admin(self._pg_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            except Exception as e:
                print(f"could not drop database {self.name}: {e}", file=sys.stderr)


def run_suite(db: Database, plan: Plan, timeout: float, tmp: Path) -> dict[str, Any]:
    """Run the sections for one database in a process of their own, within ``timeout``."""
    plan_path = tmp / f"plan-{db.kind}.json"
    out_path = tmp / f"results-{db.kind}.json"
    plan_path.write_text(json.dumps(asdict(plan)))
    env = dict(
        os.environ,
        DATABASE_URL=db.url,
        DJANGO_SETTINGS_MODULE="bench.settings",
        PYTHONPATH=str(ROOT),
    )
    # A session of its own, so that on a timeout or Ctrl-C the suite and every process it
    # started (consumers, receivers) end together.
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.suite", "--plan", str(plan_path), "--out", str(out_path)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        returncode = proc.wait(timeout)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return _partial(db, out_path, f"suite: stopped after {timeout:.0f} s")
    finally:
        cleanup_broker(plan)
    if returncode != 0:
        return _partial(db, out_path, f"suite: exited with {returncode}")
    return dict(json.loads(out_path.read_text()))


def _partial(db: Database, out_path: Path, error: str) -> dict[str, Any]:
    """What a suite that did not finish had measured (it writes after each section)."""
    results: dict[str, Any] = {"db": db.kind}
    if out_path.exists():
        with contextlib.suppress(ValueError):
            results = dict(json.loads(out_path.read_text()))
    results.setdefault("errors", []).append(error)
    return results


def cleanup_broker(plan: Plan) -> None:
    """Delete the run's queues and exchange (the suite does too, unless it was killed)."""
    from bench.broker import bench_settings, celery_queue

    settings = bench_settings(plan.amqp_url, plan.queue_prefix)
    try:
        conn = pika.BlockingConnection(pika.URLParameters(plan.amqp_url))
    except Exception as e:
        print(f"could not clean up the broker: {e}", file=sys.stderr)
        return
    try:
        for queue in (
            settings.queue,
            settings.retry_queue,
            settings.dead_letter_queue,
            celery_queue(settings),
        ):
            with contextlib.suppress(Exception):
                conn.channel().queue_delete(queue)
        with contextlib.suppress(Exception):
            conn.channel().exchange_delete(settings.exchange)
    finally:
        conn.close()


# --- tables ------------------------------------------------------------------------------------


def _m(runs: list[dict[str, Any]], key: str) -> float:
    return median(r.get(key) for r in runs)


def _fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _db_label(results: dict[str, Any]) -> str:
    return {"postgresql": "PostgreSQL", "sqlite": "SQLite"}.get(results.get("db", ""), "?")


def best_legacy_rps(results: dict[str, Any], size: str) -> float:
    per_clients = results.get("legacy", {}).get(size, {})
    values = [_m(runs, "rps") for runs in per_clients.values()]
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else math.nan


def tables(all_results: list[dict[str, Any]]) -> str:
    out: list[str] = []
    sizes = {}
    for r in all_results:
        sizes.update(r.get("body_bytes", {}))
    size_label = {s: f"{s} ({b / 1024:,.0f} KB)" for s, b in sizes.items()}

    out.append("HTTP ingest: sioworkersd-style clients (fresh connection per request, multipart).")
    out.append("")
    out.append(
        "| receiver | database | environ | clients | req/s | p50 ms | p99 ms | max ms | over 1 s |"
    )
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for section, label in (("legacy", "legacy (upstream design)"), ("shim", "shim")):
        for r in all_results:
            for size, per_clients in r.get(section, {}).items():
                for clients, runs in per_clients.items():
                    over = sum(int(x.get("over_1s", 0)) for x in runs)
                    total = sum(int(x.get("requests", 0)) for x in runs)
                    errors = sum(int(x.get("errors", 0)) + int(x.get("not_ok", 0)) for x in runs)
                    over_cell = f"{over} of {total}" + (f" ({errors} failed)" if errors else "")
                    out.append(
                        f"| {label} | {_db_label(r)} | {size_label.get(size, size)} | {clients} "
                        f"| {_fmt(_m(runs, 'rps'))} | {_fmt(_m(runs, 'p50_ms'), 1)} "
                        f"| {_fmt(_m(runs, 'p99_ms'), 1)} | {_fmt(_m(runs, 'max_ms'), 0)} "
                        f"| {over_cell} |"
                    )
    out.append("")
    out.append("Consumer drain: a pre-filled queue of results for waiting jobs, one consumer")
    out.append("process; results committed and acked per second between the 5% and 95% marks.")
    out.append("*With recipes*: the consumer also runs each resumed job's recipe after the ack, as")
    out.append("it does in production. *Write only*: the recipes are left to another process (the")
    out.append("legacy receiver never runs them either: Celery does). Ratios are to the best")
    out.append("legacy req/s (1 or 8 clients) for the same database and environ size.")
    out.append("")
    out.append("| database | environ | messages | with recipes/s | ratio | write only/s | ratio |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in all_results:
        for size in SIZES:
            drain = r.get("drain", {}).get(size, [])
            handoff = r.get("handoff", {}).get(size, [])
            if not drain and not handoff:
                continue
            legacy = best_legacy_rps(r, size)
            cells = []
            for runs in (drain, handoff):
                rate = _m(runs, "rate")
                cells += [_fmt(rate), _fmt(rate / legacy, 1) if legacy else "-"]
            messages = (drain or handoff)[0]["messages"]
            out.append(
                f"| {_db_label(r)} | {size_label.get(size, size)} | {messages:,} | "
                + " | ".join(cells)
                + " |"
            )
    out.append("")
    out.append("End to end (small environs): publish (with confirm) to commit, at a steady offered")
    out.append("rate; the highest rate at which p99 stays under 250 ms over a step.")
    out.append("")
    out.append("| database | offered/s | p50 ms | p99 ms | max ms | max sustained/s |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in all_results:
        runs = r.get("e2e", [])
        if not runs and not r.get("max_rate"):
            continue
        mr = r.get("max_rate", {})
        rate_cell = _fmt(mr.get("rate", math.nan))
        if mr.get("publisher_bound"):
            rate_cell = f"≥ {rate_cell} (publisher-bound)"
        elif mr.get("never_fell_behind"):
            rate_cell = f"≥ {rate_cell}"
        out.append(
            f"| {_db_label(r)} | {_fmt(_m(runs, 'offered'))} | {_fmt(_m(runs, 'p50_ms'), 1)} "
            f"| {_fmt(_m(runs, 'p99_ms'), 1)} | {_fmt(_m(runs, 'max_ms'), 0)} | {rate_cell} |"
        )
    out.append("")
    out.append("Memory: the consumer's resident set over one long drain of small environs.")
    out.append("")
    out.append("| database | messages | peak RSS at first 10% | peak RSS at the end | growth |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    for r in all_results:
        mem = r.get("memory")
        if not mem:
            continue
        messages = f"{mem['messages']:,}"
        if mem.get("time_capped"):
            messages += f" of {mem['planned']:,} (time limit)"
        out.append(
            f"| {_db_label(r)} | {messages} | {mem['hwm_first_kib'] / 1024:.1f} MiB "
            f"(at {mem['first_at']:,}) | {mem['hwm_end_kib'] / 1024:.1f} MiB "
            f"| {100 * mem['growth']:+.1f}% |"
        )
    out.append("")
    out.append("Memory: the consumer's peak resident set while it drains large environs, against")
    out.append("its size at rest (started on an empty queue, then sent the results at once).")
    out.append("")
    out.append("| database | messages | at rest | peak | growth | 2x RESULTS_BATCH_BYTES |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in all_results:
        mem = r.get("memory_large")
        if not mem:
            continue
        out.append(
            f"| {_db_label(r)} | {mem['messages']:,} | {mem['idle_kib'] / 1024:.1f} MiB "
            f"| {mem['hwm_kib'] / 1024:.1f} MiB | {mem['growth_kib'] / 1024:+.1f} MiB "
            f"| {2 * mem['batch_bytes'] / 2**20:.0f} MiB |"
        )
    return "\n".join(out)


def verdicts(results: dict[str, Any]) -> list[str]:
    """The issue's targets, on one database's results (PostgreSQL, small environs)."""
    lines = []
    legacy = best_legacy_rps(results, "small")
    drain = _m(results.get("drain", {}).get("small", []), "rate")
    shim_runs = results.get("shim", {}).get("small", {}).get("8", [])
    shim_rps, shim_p99 = _m(shim_runs, "rps"), _m(shim_runs, "p99_ms")
    shim_over = sum(int(x.get("over_1s", 0)) for x in shim_runs)
    e2e_p99 = _m(results.get("e2e", []), "p99_ms")
    mem = results.get("memory") or {}

    def line(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")

    ratio = drain / legacy if legacy else math.nan
    write_only = _m(results.get("handoff", {}).get("small", []), "rate")
    line(
        ratio >= TARGETS["drain_vs_legacy"],
        f"consumer drain {_fmt(drain)}/s = {_fmt(ratio, 1)}x the best legacy {_fmt(legacy)} req/s "
        f"(target ≥ {TARGETS['drain_vs_legacy']:.0f}x); write only "
        f"{_fmt(write_only)}/s = {_fmt(write_only / legacy if legacy else math.nan, 1)}x",
    )
    ratio = shim_rps / legacy if legacy else math.nan
    line(
        ratio >= TARGETS["shim_vs_legacy"]
        and shim_p99 < TARGETS["shim_p99_ms"]
        and shim_over == 0
        and bool(shim_runs),
        f"shim with 8 clients {_fmt(shim_rps)} req/s = {_fmt(ratio, 1)}x legacy (target ≥ 3x), "
        f"p99 {_fmt(shim_p99, 1)} ms (target < 25), {shim_over} over 1 s (target 0)",
    )
    line(
        e2e_p99 < TARGETS["e2e_p99_ms"],
        f"end to end at {_fmt(_m(results.get('e2e', []), 'offered'))}/s: p99 {_fmt(e2e_p99, 1)} ms "
        f"(target < 50)",
    )
    if mem and mem.get("time_capped"):
        line(
            False,
            f"the long drain reached only {mem['messages']:,} of {mem['planned']:,} messages "
            f"within its time limit (peak RSS {100 * mem['growth']:+.1f}% from "
            f"{mem['first_at']:,} to there)",
        )
    elif mem:
        line(
            mem["growth"] <= TARGETS["rss_growth"],
            f"consumer peak RSS {mem['hwm_first_kib'] / 1024:.1f} MiB at {mem['first_at']:,} -> "
            f"{mem['hwm_end_kib'] / 1024:.1f} MiB at {mem['messages']:,} "
            f"({100 * mem['growth']:+.1f}%, target within 10%)",
        )
    else:
        line(False, "memory: not measured")
    lines.extend(real_size_verdicts(results))
    return lines


#: Real-size targets: the drain with recipes against the best legacy, by database and size.
REAL_SIZE_DRAIN = {
    ("postgresql", "small"): 8.0,
    ("postgresql", "typical"): 4.0,
    ("postgresql", "large"): 3.0,
    ("sqlite", "large"): 2.0,
}
SHIM_TYPICAL_VS_LEGACY = 4.0
SHIM_TYPICAL_P99_MS = 100.0


def real_size_verdicts(results: dict[str, Any]) -> list[str]:
    """The targets on results of real size: the drain by size, the shim on 100-test bodies, and
    the consumer's peak memory on large environs (within 2x RESULTS_BATCH_BYTES of its idle)."""
    lines = []
    db = results.get("db", "")

    def line(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")

    for (vendor, size), target in REAL_SIZE_DRAIN.items():
        if vendor != db or not results.get("drain", {}).get(size):
            continue
        legacy = best_legacy_rps(results, size)
        drain = _m(results["drain"][size], "rate")
        ratio = drain / legacy if legacy else math.nan
        line(
            ratio >= target,
            f"{size} drain with recipes {_fmt(drain)}/s = {_fmt(ratio, 1)}x the best legacy "
            f"{_fmt(legacy)} req/s (target ≥ {target:.0f}x)",
        )
    shim_runs = results.get("shim", {}).get("typical", {}).get("8", [])
    if db == "postgresql" and shim_runs:
        legacy = best_legacy_rps(results, "typical")
        rps, p99 = _m(shim_runs, "rps"), _m(shim_runs, "p99_ms")
        ratio = rps / legacy if legacy else math.nan
        line(
            ratio >= SHIM_TYPICAL_VS_LEGACY and p99 < SHIM_TYPICAL_P99_MS,
            f"shim with 8 clients, typical bodies: {_fmt(rps)} req/s = {_fmt(ratio, 1)}x legacy "
            f"(target ≥ {SHIM_TYPICAL_VS_LEGACY:.0f}x), p99 {_fmt(p99, 1)} ms "
            f"(target < {SHIM_TYPICAL_P99_MS:.0f})",
        )
    big = results.get("memory_large")
    if big:
        line(
            big["growth_kib"] * 1024 <= 2 * big["batch_bytes"],
            f"peak RSS draining large environs {big['growth_kib'] / 1024:+.1f} MiB over idle "
            f"(target within 2x RESULTS_BATCH_BYTES = {2 * big['batch_bytes'] / 2**20:.0f} MiB)",
        )
    return lines


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="The full run (README figures).")
    parser.add_argument(
        "--db", default="postgres,sqlite", help="Databases, comma-separated: postgres, sqlite."
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help="Sections, comma-separated.")
    parser.add_argument("--sizes", default=",".join(SIZES), help="Environ sizes, comma-separated.")
    parser.add_argument("--repeats", type=int, help="Runs of each configuration (median shown).")
    parser.add_argument("--memory-count", type=int, help="Messages in the long drain.")
    parser.add_argument(
        "--e2e-rate", type=float, default=200.0, help="Offered rate of the end-to-end run, per s."
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        help="A PostgreSQL database to connect to for creating and dropping the benchmark's own.",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        help="The broker (the benchmark declares and deletes queues of its own there).",
    )
    parser.add_argument("--json", help="Also write all figures to this file.")
    parser.add_argument("--keep-logs", action="store_true", help="Keep the processes' logs.")
    args = parser.parse_args()
    # Stopped by SIGTERM, or by Ctrl-C even when started in the background (where SIGINT is
    # ignored by default): unwind, so that the suite's processes, database and queues go away.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    preset = dict(PRESETS["full" if args.full else "quick"])
    timeouts = preset.pop("timeout")
    memory_counts = preset.pop("memory_count")
    memory_seconds = preset.pop("memory_seconds")
    if args.repeats:
        preset["repeats"] = args.repeats
    tmp = Path(tempfile.mkdtemp(prefix="oioioi-bench-"))
    started = time.monotonic()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    all_results: list[dict[str, Any]] = []
    try:
        for kind in [d.strip() for d in args.db.split(",") if d.strip()]:
            if kind not in ("postgres", "sqlite"):
                parser.error(f"unknown database {kind!r}")
            db = Database(kind, args.pg_url, tmp)
            plan = Plan(
                sections=[s for s in args.only.split(",") if s],
                sizes=[s for s in args.sizes.split(",") if s],
                clients=[1, 8],
                e2e_rate=args.e2e_rate,
                amqp_url=args.amqp_url,
                log_dir=str(tmp),
                database_url=db.url,
                queue_prefix=f"bench{uuid.uuid4().hex[:10]}",
                memory_count=args.memory_count or memory_counts[kind],
                memory_seconds=memory_seconds[kind],
                **preset,
            )
            print(f"== {kind}: database {db.name}", file=sys.stderr, flush=True)
            try:
                db.create()
                all_results.append(run_suite(db, plan, timeouts[kind], tmp))
            finally:
                db.drop()
    finally:
        if args.keep_logs:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    print()
    print(
        f"Command: `{command.strip()}`; {when}; {elapsed / 60:.1f} min; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}."
    )
    print()
    print(tables(all_results))
    for r in all_results:
        print()
        print(f"Targets ({_db_label(r)}, small environs, one consumer process):")
        print("\n".join(verdicts(r)))
        for error in r.get("errors", []):
            # The first line; the rest (a process's last log lines) is in the --json output.
            print(f"- error: {error.splitlines()[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=1))
    return 1 if any(r.get("errors") for r in all_results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(
            "Interrupted; the run's processes, database and queues were removed.", file=sys.stderr
        )
        sys.exit(130)
