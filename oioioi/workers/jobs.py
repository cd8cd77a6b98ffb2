"""Job-state bookkeeping for many jobs at once, on the evaluation manager's ``QueuedJob`` table.

:func:`mark_jobs_state` does for a list of jobs what upstream's ``mark_job_state`` does for one,
with a few statements for the whole list; :func:`delete_jobs` is upstream's ``_job_finished`` for
many. Both work on upstream's model as it is: its ``submission`` is a foreign key there (a plain
column in the stand-in), and, as upstream, a job records its submission only if that submission
exists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.sql import (
    can_delete_plainly,
    chunks,
    delete_in,
    select_in,
    update_each,
    update_in,
)
from oioioi.workers.transactions import require_transaction

log = logging.getLogger(__name__)

#: What :func:`lock_jobs` maps a job to that was CANCELLED (and is deleted now).
CANCELLED = ("CANCELLED", None)


def distinct_jobs(environs: Sequence[Mapping[str, Any]]) -> bool:
    job_ids = [env["job_id"] for env in environs]
    return len(set(job_ids)) == len(job_ids)


def _submission_id(environ: Mapping[str, Any]) -> int | None:
    value = environ.get("submission_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _submissions(environs: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
    """The submission to record for each job: the environ's, where upstream's ``mark_job_state``
    would record it (a foreign key records only a submission that exists)."""
    wanted = {env["job_id"]: _submission_id(env) for env in environs}
    field = QueuedJob._meta.get_field("submission_id")
    related = field.related_model if field.is_relation else None
    if related is not None and not isinstance(related, str):
        ids = {value for value in wanted.values() if value is not None}
        found = related._default_manager.filter(pk__in=ids).values_list("pk", flat=True)
        existing = set(found) if ids else set()
        wanted = {job_id: (v if v in existing else None) for job_id, v in wanted.items()}
    return wanted


@require_transaction
def mark_jobs_state(environs: Sequence[Mapping[str, Any]], state: str) -> list[bool]:
    """``mark_job_state`` for environs of distinct jobs.

    Returns, for each environ, whether its job goes on (False: it was CANCELLED, and its
    ``QueuedJob`` is deleted). The jobs' rows are locked in ``job_id`` order, so that two callers
    with overlapping lists cannot deadlock on them.
    """
    found = lock_jobs(environs)
    going = [env for env in environs if found.get(env["job_id"]) != CANCELLED]
    set_states(going, found, state)
    return [found.get(env["job_id"]) != CANCELLED for env in environs]


def lock_jobs(environs: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, int | None]]:
    """Lock the environs' jobs and read their state and submission; a CANCELLED job is deleted
    (as ``mark_job_state`` deletes it) and maps to :data:`CANCELLED`."""
    if not distinct_jobs(environs):
        raise ValueError("the environs must be of distinct jobs")
    rows = select_in(
        QueuedJob,
        ["job_id", "state", "submission_id"],
        "job_id",
        [env["job_id"] for env in environs],
        lock=True,
    )
    found: dict[str, tuple[str, int | None]] = {job_id: (st, sid) for job_id, st, sid in rows}
    cancelled = sorted(job_id for job_id, (st, _) in found.items() if st == "CANCELLED")
    if cancelled:
        QueuedJob.objects.filter(job_id__in=cancelled).delete()
        for job_id in cancelled:
            log.info("Job %r cancelled.", job_id)
            found[job_id] = CANCELLED
    return found


def set_states(
    environs: Sequence[Mapping[str, Any]],
    found: Mapping[str, tuple[str, int | None]],
    state: str,
    task_ids: Mapping[str, str] | None = None,
) -> None:
    """Give the jobs of ``environs`` (none cancelled) ``state``, and the task ids if given,
    creating the ones not in ``found``."""
    present = sorted(env["job_id"] for env in environs if env["job_id"] in found)
    if task_ids is not None:
        update_each(
            QueuedJob,
            "job_id",
            "celery_task_id",
            {job_id: task_ids[job_id] for job_id in present},
            also={"state": state},
        )
    elif present:
        update_in(QueuedJob, "job_id", present, {"state": state})
    submissions = _submissions(environs)
    missing = [env for env in environs if env["job_id"] not in found]
    if missing:
        QueuedJob.objects.bulk_create(
            [
                QueuedJob(
                    job_id=env["job_id"],
                    state=state,
                    submission_id=submissions[env["job_id"]],
                    celery_task_id=task_ids.get(env["job_id"]) if task_ids else None,
                )
                for env in missing
            ]
        )
    for job_id, submission_id in submissions.items():
        # mark_job_state also sets the submission, which does not change in practice.
        if job_id in found and submission_id is not None and found[job_id][1] != submission_id:
            QueuedJob.objects.filter(job_id=job_id).update(submission_id=submission_id)


def delete_jobs(job_ids: Sequence[str]) -> None:
    """Delete finished jobs (and any saved environ left of them), as ``_job_finished`` does."""
    if not (
        can_delete_plainly(QueuedJob, but_for=[SavedEnviron]) and can_delete_plainly(SavedEnviron)
    ):
        for part in chunks(sorted(job_ids)):
            QueuedJob.objects.filter(job_id__in=part).delete()
        return
    # What the collector would do, without its SELECT of every row it deletes.
    delete_in(SavedEnviron, "queued_job", job_ids)
    delete_in(QueuedJob, "job_id", job_ids)
