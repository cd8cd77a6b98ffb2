"""Many jobs WAITING for sioworkersd, made fast: the rows OIOIOI's ``_transfer_job`` leaves behind.

Making each through the evaluation manager takes a few transactions per job; a benchmark needs tens
of thousands, so the same rows (a ``QueuedJob`` in state WAITING and its ``SavedEnviron`` with the
restore function and the rest of the recipe) are bulk-inserted instead.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass

from bench.environs import Template

_submission_ids = itertools.count(1)


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    submission_id: int
    saved_environ_id: int


def create_waiting_jobs(template: Template, count: int, chunk: int = 2000) -> list[WaitingJob]:
    from django.db import transaction

    from oioioi.evalmgr.models import QueuedJob, SavedEnviron

    jobs: list[WaitingJob] = []
    # Large environs in smaller statements, so that no single INSERT carries hundreds of MB.
    chunk = max(1, min(chunk, 200_000_000 // max(1, len(template.saved_json("x", 0)))))
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        ids = [(uuid.uuid4().urn, next(_submission_ids)) for _ in range(n)]
        with transaction.atomic():
            QueuedJob.objects.bulk_create(
                [QueuedJob(job_id=j, state="WAITING", submission_id=s) for j, s in ids]
            )
            saved = SavedEnviron.objects.bulk_create(
                [SavedEnviron(queued_job_id=j, environ=template.saved_json(j, s)) for j, s in ids]
            )
        jobs.extend(
            WaitingJob(job_id=j, submission_id=s, saved_environ_id=row.pk)
            for (j, s), row in zip(ids, saved, strict=True)
        )
    return jobs


def clear_tables() -> None:
    """Empty the tables a run fills, so that each run starts from the same state."""
    from oioioi.evalmgr.models import QueuedJob, SavedEnviron
    from oioioi.workers.models import PendingRun, ReceivedResult

    for model in (SavedEnviron, QueuedJob, PendingRun, ReceivedResult):
        model.objects.all()._raw_delete(model.objects.db)
