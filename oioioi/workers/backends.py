"""A sioworkers backend for a single-machine OIOIOI that returns results through the queue.

Upstream's ``LocalBackend`` runs a job group in the process that transfers it (an evalmgr Celery
worker) and then resumes the job itself with ``delay_environ``: no inbox, no durable hand-off,
and a resume that fails is a lost result. :class:`QueueBackend` runs the jobs exactly the same
way (it is a ``LocalBackend``) and then does what sioworkersd does with a finished group: it
returns it, here by publishing it to the results exchange (persistent, confirmed, ``message_id``
the group's id). The consumer resumes the job from there, with every guarantee of the return
path. In OIOIOI's settings::

    SIOWORKERS_BACKEND = "oioioi.workers.backends.QueueBackend"

The broker and exchange are the return path's settings (``AMQP_URL``, ``RESULTS_EXCHANGE``, ...).
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import uuid4

from django.db import transaction

from consumer.publish import publish
from oioioi.sioworkers.backends import LocalBackend
from oioioi.workers.conf import consumer_settings

log = logging.getLogger(__name__)


def new_group_id() -> str:
    """A group id as sioworkersd makes them."""
    return "GROUP_" + uuid4().urn


class QueueBackend(LocalBackend):
    """Runs the jobs in this process, like ``LocalBackend``; returns the result through the queue."""

    def send_async_jobs(self, env: dict[str, Any], **kwargs: Any) -> None:
        env["workers_jobs.results"] = self.run_jobs(
            env["workers_jobs"], **env.get("workers_jobs.extra_args", {})
        )
        del env["workers_jobs"]
        env.pop("workers_jobs.extra_args", None)
        # Always a new one, as sioworkersd does: a job resumed before carries the group id of its
        # earlier result, and the consumer would take a second result under it for a copy.
        env["group_id"] = new_group_id()
        # Upstream calls a transfer function outside any transaction, and then this publishes at
        # once and a failure reaches the evaluation manager, which drops the job's saved environ.
        # Inside a transaction (Celery eager, as in upstream's tests) the job's saved environ is
        # not committed yet: the result must not reach the consumer before it is.
        transaction.on_commit(lambda: self._publish(env))

    def _publish(self, env: dict[str, Any]) -> None:
        settings = consumer_settings()
        publish(env, settings)
        log.info(
            "Results of job %r (group %r) published to %r.",
            env.get("job_id"),
            env["group_id"],
            settings.exchange,
        )
