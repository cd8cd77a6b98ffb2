"""Sending job groups to sioworkersd through the backend named in ``settings.SIOWORKERS_BACKEND``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string


def _get_backend() -> Any:
    return import_string(settings.SIOWORKERS_BACKEND)()


def send_async_jobs(env: dict[str, Any], **kwargs: Any) -> Any:
    if settings.FILETRACKER_URL:
        for job in env.get("workers_jobs", {}).values():
            job["filetracker_url"] = settings.FILETRACKER_URL
    return _get_backend().send_async_jobs(env, **kwargs)
