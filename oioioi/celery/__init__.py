"""Stand-in for upstream OIOIOI's ``oioioi.celery``: the Celery app, configured from Django's
settings, so that ``shared_task`` (``evalmgr_job``) binds to it as it does upstream."""

from oioioi.celery.celery import app as celery_app

__all__ = ["celery_app"]
