"""Recipe phases for tests: a real transfer to sioworkers, and steps that leave a trace."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from oioioi.evalmgr.tasks import create_environ, transfer_job
from tests.recipeapp.models import StepLog


def transfer_to_workers(env: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    env["workers_jobs"] = {"job0": {"job_type": "ping", "ping": env["job_id"]}}
    return transfer_job(
        env, "oioioi.sioworkers.handlers.transfer_job", "oioioi.sioworkers.handlers.restore_job"
    )


def record(env: dict[str, Any], step: str, **kwargs: Any) -> dict[str, Any]:
    results = env.get("workers_jobs.results")
    StepLog.objects.create(
        job_id=env["job_id"], step=step, detail=json.dumps(sorted(results)) if results else ""
    )
    return env


def record_pid(env: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Record which process ran the recipe (step ``pid``, the process id as its detail)."""
    StepLog.objects.create(job_id=env["job_id"], step="pid", detail=str(os.getpid()))
    return env


def slow(env: dict[str, Any], seconds: float, **kwargs: Any) -> dict[str, Any]:
    time.sleep(seconds)
    return env


def crash_if_flagged(env: dict[str, Any], flag: str, **kwargs: Any) -> dict[str, Any]:
    """Kill the process (as a power loss would) while the file ``flag`` exists."""
    if os.path.exists(flag):
        os._exit(137)
    return env


def new_job_environ(
    submission_id: int | None = None, after: list[Any] | None = None
) -> dict[str, Any]:
    """An environ that transfers to sioworkers, then records a step when its results arrive."""
    env = create_environ()
    if submission_id is not None:
        env["submission_id"] = submission_id
    env["recipe"] = [
        ("transfer", "tests.recipeapp.recipes.transfer_to_workers"),
        *(after or []),
        ("record", "tests.recipeapp.recipes.record", {"step": "after-results"}),
    ]
    return env


def slow_restore(saved_environ: dict[str, Any], resuming_environ: dict[str, Any]) -> dict[str, Any]:
    """A restore function that takes a while, so that a test can signal the consumer meanwhile."""
    import logging

    logging.getLogger(__name__).warning("slow restore started")
    time.sleep(3)
    saved_environ.update(resuming_environ)
    return saved_environ


def crash_restore(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """A restore function that kills the process mid-write while the saved ``crash_flag`` exists."""
    flag = saved_environ.pop("crash_flag", None)
    if flag and os.path.exists(flag):
        os._exit(137)
    saved_environ.update(resuming_environ)
    return saved_environ


def operational_error_restore(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """A restore function failing the way a statement timeout caused by the message would."""
    from django.db import OperationalError

    raise OperationalError("canceling statement due to statement timeout")


def slow_failing_restore(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """A restore function that takes a while, then fails as a bug would."""
    import logging

    logging.getLogger(__name__).warning("slow restore started")
    time.sleep(3)
    raise ValueError("restore failed after a while")


def crash_after_commit_restore(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """A restore function that kills the process right after the write commits, before the ack,
    while the saved ``crash_flag`` exists."""
    from django.db import transaction

    flag = saved_environ.pop("crash_flag", None)
    if flag and os.path.exists(flag):
        transaction.on_commit(lambda: os._exit(137))
    saved_environ.update(resuming_environ)
    return saved_environ


def fail(env: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A phase with a bug."""
    raise ValueError(f"phase failed for {env['job_id']}")


def fail_once(env: dict[str, Any], flag: str, **kwargs: Any) -> dict[str, Any]:
    """A phase that loses the database (the first time, while the file ``flag`` exists)."""
    from django.db import OperationalError

    if os.path.exists(flag):
        os.remove(flag)
        raise OperationalError("server closed the connection unexpectedly")
    return env


def take_over(env: dict[str, Any], job_id: str, **kwargs: Any) -> dict[str, Any]:
    """Hand the run of another job to another runner, as one whose lease had expired would."""
    from oioioi.workers.models import PendingRun

    PendingRun.objects.filter(job_id=job_id).update(claimed_by="elsewhere")
    return env


def failing_restore(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """A restore function with a bug."""
    raise ValueError("restore failed")


def counting_restore(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """A restore function that reads values, as Zeus's does: it must be given decoded environs."""
    saved_environ["result_count"] = len(resuming_environ["workers_jobs.results"])
    saved_environ.setdefault("reports", []).extend(sorted(resuming_environ["workers_jobs.results"]))
    return saved_environ


class DispatchOnly:
    """A dispatcher of another lineage: it knows dispatch() and nothing of batches."""

    def dispatch(self, environ: dict[str, Any], **extra: Any) -> str:
        return f"t-{environ['submission_id']}"

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        return 0


def ignore(env: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A phase that stops its job silently, as upstream's suspendjudge does (Celery's Ignore)."""
    from celery.exceptions import Ignore

    raise Ignore


def transfer_failing(env: dict[str, Any], error: str, **kwargs: Any) -> dict[str, Any]:
    """A phase that transfers its job to an external system that fails (see
    :func:`failing_transfer`)."""
    return transfer_job(
        env,
        "tests.recipeapp.recipes.failing_transfer",
        "oioioi.sioworkers.handlers.restore_job",
        {"error": error},
    )


def failing_transfer(env: dict[str, Any], error: str, **kwargs: Any) -> None:
    """A transfer that fails: with a bug, on the database, or stopping the job (Celery's Ignore)."""
    from celery.exceptions import Ignore
    from django.db import OperationalError

    if error == "database":
        raise OperationalError("server closed the connection unexpectedly")
    if error == "ignore":
        raise Ignore
    raise ValueError(f"transfer failed for {env['job_id']}")
