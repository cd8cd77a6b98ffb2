"""Upstream's evaluation-manager tables: ``evalmgr_queuedjob`` and ``evalmgr_savedenviron``."""

from __future__ import annotations

import json
from typing import Any

from django.db import models
from django.utils import timezone

#: The states a job passes through, as upstream names them.
JOB_STATES = [
    ("QUEUED", "Queued"),
    ("PROGRESS", "In progress"),
    ("CANCELLED", "Cancelled"),
    ("WAITING", "Waiting"),
]


class QueuedJob(models.Model):
    job_id = models.CharField(max_length=50, primary_key=True)
    state = models.CharField(max_length=64, choices=JOB_STATES, default="QUEUED")
    creation_date = models.DateTimeField(default=timezone.now)

    # Upstream has a foreign key to contests.Submission here; the column is the same
    # (``submission_id``), kept as a plain integer because this project has no contests app.
    submission_id = models.IntegerField(null=True, blank=True, db_index=True)
    celery_task_id = models.CharField(max_length=50, unique=True, null=True, blank=True)

    class Meta:
        verbose_name = "Queued job"
        verbose_name_plural = "Queued jobs"
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"{self.job_id} ({self.state})"


class SavedEnviron(models.Model):
    # queued_job is not the primary key: a result of an earlier transfer of the same job must not
    # resume a later one.
    queued_job = models.OneToOneField(QueuedJob, on_delete=models.CASCADE)
    environ = models.TextField(help_text="JSON-encoded evaluation environ")
    save_time = models.DateTimeField(
        auto_now=True, help_text="Time and date when the environ was saved"
    )

    def __str__(self) -> str:
        return f"SavedEnviron {self.pk} of {self.queued_job_id}"

    def load_environ(self) -> dict[str, Any]:
        return json.loads(self.environ)

    @classmethod
    def save_environ(cls, environ: dict[str, Any]) -> SavedEnviron:
        return cls.objects.create(
            queued_job=QueuedJob.objects.get(job_id=environ["job_id"]),
            environ=json.dumps(environ),
        )
