"""Recipe steps and restore functions of the tests' jobs.

A job's recipe transfers it to sioworkers with upstream's ``transfer_job`` (upstream's
``oioioi.sioworkers.handlers`` as the transfer and, by default, restore functions), then
records a step once its results are back. The restore functions here wrap upstream's
``restore_job`` to kill the consumer at a chosen point of its write, while a flag file exists.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from django.db import transaction
from results_e2e.models import StepLog

from oioioi.evalmgr.tasks import transfer_job
from oioioi.sioworkers.handlers import restore_job

UPSTREAM_RESTORE = "oioioi.sioworkers.handlers.restore_job"


def transfer_to_workers(
    env: dict[str, Any],
    restore: str = UPSTREAM_RESTORE,
    crash_flag: str | None = None,
    jobs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Send the job to sioworkers with ``jobs`` (by default one ping job), as upstream's handlers
    do."""
    env["workers_jobs"] = jobs or {"job0": {"job_type": "ping", "ping": env["job_id"]}}
    if crash_flag:
        env["crash_flag"] = crash_flag
    return transfer_job(env, "oioioi.sioworkers.handlers.transfer_job", restore)


def record(env: dict[str, Any], step: str, **kwargs: Any) -> dict[str, Any]:
    """Leave a row saying that this step ran, in which process, with which results."""
    results = env.get("workers_jobs.results")
    StepLog.objects.create(
        job_id=env["job_id"],
        step=step,
        pid=os.getpid(),
        detail=json.dumps(results, sort_keys=True) if results else "",
    )
    return env


def _inbox_keys() -> list[str]:
    """The inbox rows this transaction sees: those committed before it, and its own."""
    from oioioi.workers.models import ReceivedResult

    return sorted(ReceivedResult.objects.values_list("key", flat=True))


def _die(flag: str, keys: list[str]) -> None:
    # The evidence first: which results the transaction being killed (or just committed) held.
    Path(flag + ".keys").write_text(json.dumps(keys))
    os.kill(os.getpid(), signal.SIGKILL)


def _armed(saved_environ: dict[str, Any]) -> str | None:
    flag = saved_environ.get("crash_flag")
    return flag if flag and os.path.exists(flag) else None


def kill_after_commit(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """``restore_job``; while the flag exists, SIGKILL the process right after the write commits,
    before the ack."""
    flag = _armed(saved_environ)
    if flag:
        keys = _inbox_keys()
        transaction.on_commit(lambda: _die(flag, keys))
    return restore_job(saved_environ, resuming_environ)


def kill_mid_write(
    saved_environ: dict[str, Any], resuming_environ: dict[str, Any]
) -> dict[str, Any]:
    """``restore_job``; while the flag exists, SIGKILL the process in the middle of the write,
    before its commit."""
    flag = _armed(saved_environ)
    if flag:
        _die(flag, _inbox_keys())
    return restore_job(saved_environ, resuming_environ)
