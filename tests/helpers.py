"""Small helpers the test modules share."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def job_done(job_id: str) -> Callable[[], bool]:
    """A predicate: the recipe ran its step after the results, and the job and its run are gone."""
    from oioioi.evalmgr.models import QueuedJob
    from oioioi.workers.models import PendingRun
    from tests.recipeapp.models import StepLog

    return lambda: (
        StepLog.objects.filter(job_id=job_id, step="after-results").exists()
        and not QueuedJob.objects.filter(job_id=job_id).exists()
        and not PendingRun.objects.filter(job_id=job_id).exists()
    )
