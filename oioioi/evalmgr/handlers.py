"""Recipe and error handlers that ship with the evaluation manager."""

from __future__ import annotations

import logging
import pprint
from typing import Any

from django.db import transaction

from oioioi.evalmgr.models import QueuedJob

log = logging.getLogger(__name__)


def remove_queuedjob_on_error(environ: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Error handler every environ gets from ``create_environ``: forget the failed job."""
    with transaction.atomic():
        QueuedJob.objects.filter(job_id=environ["job_id"]).delete()
    return environ


def error_handled(environ: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    environ["ignore_errors"] = True
    return environ


def dump_env(environ: dict[str, Any], message: str, **kwargs: Any) -> dict[str, Any]:
    log.debug("%s:\n%s", message, pprint.pformat(environ, indent=4))
    return environ
