"""The Celery app of the stand-in (upstream: ``celery -A oioioi.celery worker -Q evalmgr``)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "oioioi.settings")

from django.conf import settings

app = Celery("oioioi")
# Upstream's setting names (BROKER_URL, CELERY_ALWAYS_EAGER, CELERY_ROUTES, ...), read as it reads
# them.
app.config_from_object("django.conf:settings")
app.autodiscover_tasks(lambda: settings.INSTALLED_APPS)
