"""Job-state bookkeeping shared by the evaluation manager and its callers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import transaction

from oioioi.evalmgr.models import QueuedJob

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def require_transaction(func: F) -> F:
    """Refuse to run ``func`` outside ``transaction.atomic()`` (upstream's decorator)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not transaction.get_connection().in_atomic_block:
            raise RuntimeError(f"{func.__qualname__} must be called inside a transaction")
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@require_transaction
def mark_job_state(environ: dict[str, Any], state: str, **kwargs: Any) -> bool:
    """Set the state of the environ's job, creating the QueuedJob if needed.

    Returns True when the job should go on, False when it was CANCELLED (the QueuedJob is then
    deleted, as upstream does).
    """
    submission_id = environ.get("submission_id")
    if isinstance(submission_id, int):
        kwargs["submission_id"] = submission_id
    kwargs["state"] = state
    job, created = QueuedJob.objects.get_or_create(job_id=environ["job_id"], defaults=kwargs)
    if not created:
        if job.state == "CANCELLED":
            job.delete()
            log.info("Job %r cancelled.", environ["job_id"])
            return False
        for name, value in kwargs.items():
            setattr(job, name, value)
        job.save(update_fields=list(kwargs))
    return True
