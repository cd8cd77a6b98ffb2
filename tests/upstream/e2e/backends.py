"""A sioworkers backend for the tests: it records each job group instead of sending it.

The test then plays sioworkersd's part: it reads the group that was sent and publishes the
result sioworkersd would return for it (:func:`results_e2e.conftest.sioworkersd_result`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def groups_dir() -> Path:
    """Where the groups are recorded: the run's scratch folder, which every process knows."""
    return Path(os.environ["RESULTS_E2E_TMP"]) / "groups"


def group_path(job_id: str) -> Path:
    return groups_dir() / (job_id.replace(":", "_").replace("/", "_") + ".json")


class RecordingBackend:
    """Records the group sent for a job (upstream's transfer calls ``send_async_jobs``)."""

    def send_async_jobs(self, env: dict[str, Any], **kwargs: Any) -> None:
        path = group_path(str(env["job_id"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"env": env, "pid": os.getpid()}
        # Written whole, then renamed: a test polling for the file never reads half of it.
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
