"""The Celery side of the hand-off: the task that runs a relayed pending run in an evalmgr worker.

:class:`~oioioi.workers.dispatch.CeleryDispatcher` publishes :func:`run_pending_job` with the run's
primary key, to the queue upstream routes ``evalmgr_job`` to, so that the same workers run it. The
task claims the run (it may take over the relay's claim, nobody else's), runs upstream's
``evalmgr_job`` on its environ in this process, and deletes the run. A second copy of the task
finds the run claimed or gone and does nothing, so a run relayed twice is run once.

Celery's autodiscovery imports this module in every worker (``<app>.tasks`` of each installed app).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from celery import shared_task
from django.db import close_old_connections

from oioioi.evalmgr.tasks import evalmgr_job
from oioioi.workers.claims import claim_environ, claim_token
from oioioi.workers.logging import route_library_logs
from oioioi.workers.models import PendingRun
from oioioi.workers.runner import outcome_logged

log = logging.getLogger(__name__)

#: The task's name, fixed: the relay and the workers must agree on it whatever imports it.
TASK_NAME = "oioioi.workers.tasks.run_pending_job"


@shared_task(name=TASK_NAME, ignore_result=True, acks_late=True)
def run_pending_job(run_id: int) -> None:
    """Run pending run ``run_id`` through upstream's ``evalmgr_job``, once."""
    route_library_logs()
    close_old_connections()
    token = claim_token("celery:")
    text = claim_environ(run_id, token)
    if text is None:
        log.info("Run %r is held by another runner or already done; nothing to do.", run_id)
        return
    environ = json.loads(text)
    # An error of the infrastructure leaves the run claimed: once the lease expires, a sweep
    # hands it to Celery again. Otherwise evalmgr_job has run the job's error handlers, or the
    # job was cancelled: either way the job is over.
    with outcome_logged(environ.get("job_id")):
        evalmgr_job(environ)
    PendingRun.objects.filter(pk=run_id, claimed_by=token).delete()


def _queue() -> Any:
    """The queue upstream routes ``evalmgr_job`` to (``CELERY_ROUTES``: ``evalmgr``)."""
    router = run_pending_job.app.amqp.router
    return router.route({}, evalmgr_job.name).get("queue")


def publish(run_ids: Sequence[int]) -> None:
    """Publish a task for each run and wait for the broker's confirms (an error if any fails)."""
    app = run_pending_job.app
    queue = _queue()
    with app.connection_for_write(transport_options={"confirm_publish": True}) as conn:
        for run_id in run_ids:
            run_pending_job.apply_async(
                (run_id,), task_id=f"run-{run_id}", queue=queue, connection=conn, retry=False
            )
