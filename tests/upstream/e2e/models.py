"""What the tests' recipes leave behind: one row per recipe step that ran."""

from django.db import models


class StepLog(models.Model):
    """A recipe step that ran (``results_e2e.recipes.record``), in which process, with what."""

    id = models.BigAutoField(primary_key=True)
    job_id = models.CharField(max_length=255, db_index=True)
    step = models.CharField(max_length=64)
    #: The process that ran the step: the tests tell a Celery worker from a consumer by it.
    pid = models.IntegerField()
    #: The job's ``workers_jobs.results`` as JSON, when it had any.
    detail = models.TextField(blank=True, default="")
