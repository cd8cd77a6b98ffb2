from django.db import models


class StepLog(models.Model):
    """One row per committed recipe step, so tests can count how often each step ran."""

    job_id = models.CharField(max_length=255, db_index=True)
    step = models.CharField(max_length=64)
    detail = models.TextField(blank=True, default="")
