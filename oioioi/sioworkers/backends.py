"""Sioworkers backends that ship here. A real deployment names upstream's SioworkersdBackend."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class NullBackend:
    """Logs the job group it would send; the result is expected to come back through the queue."""

    def send_async_jobs(self, env: dict[str, Any], **kwargs: Any) -> None:
        log.info(
            "Job group of job %r (saved environ %r) handed to the null sioworkers backend.",
            env.get("job_id"),
            env.get("saved_environ_id"),
        )
