"""Stand-in for upstream OIOIOI's ``oioioi.sioworkers.backends``: its ``LocalBackend`` (and a
``NullBackend`` of this project's). A real deployment names upstream's ``SioworkersdBackend``.

``LocalBackend`` has upstream's shape: ``run_job`` runs one job in this process, ``run_jobs`` a
dict of them, ``send_async_jobs`` runs a job group and resumes its job with ``delay_environ``.
Upstream runs every job type with ``sio.workers.runner.run``; so does this stand-in where the
sioworkers package is installed, and otherwise it knows only sioworkers' ``ping`` job.
"""

from __future__ import annotations

import logging
from threading import Lock
from typing import Any

from django.db import transaction

from oioioi.evalmgr.tasks import delay_environ

try:
    import sio.workers.runner as sio_runner  # type: ignore[import-not-found]
except ImportError:  # the standalone project does not need sioworkers
    sio_runner = None

log = logging.getLogger(__name__)

#: As upstream: sioworkers' runner changes the working directory, one job at a time.
_local_backend_lock = Lock()


def _ping(job: dict[str, Any]) -> dict[str, Any]:
    """sioworkers' ``ping`` job (``sio.workers.ping.run``)."""
    job["pong"] = job["ping"]
    return job


class LocalBackend:
    """Runs the jobs in the calling process, then resumes the job (upstream's test backend)."""

    def run_job(self, job: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        with _local_backend_lock:
            if sio_runner is not None:
                result: dict[str, Any] = sio_runner.run(job)
                return result
            if job.get("job_type") != "ping":
                raise RuntimeError(
                    f"sioworkers is not installed: job type {job.get('job_type')!r} cannot run here"
                )
            return _ping(job)

    def run_jobs(self, dict_of_jobs: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {key: self.run_job(job, **kwargs) for key, job in dict_of_jobs.items()}

    def send_async_jobs(self, env: dict[str, Any], **kwargs: Any) -> None:
        env["workers_jobs.results"] = self.run_jobs(
            env["workers_jobs"], **env.get("workers_jobs.extra_args", {})
        )
        del env["workers_jobs"]
        env.pop("workers_jobs.extra_args", None)
        with transaction.atomic():
            delay_environ(env)


class NullBackend:
    """Logs the job group it would send; the result is expected to come back through the queue."""

    def send_async_jobs(self, env: dict[str, Any], **kwargs: Any) -> None:
        log.info(
            "Job group of job %r (saved environ %r) handed to the null sioworkers backend.",
            env.get("job_id"),
            env.get("saved_environ_id"),
        )
