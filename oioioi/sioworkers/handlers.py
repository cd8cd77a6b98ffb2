"""Transfer and restore functions for jobs evaluated by sioworkersd (as upstream OIOIOI's)."""

from __future__ import annotations

from typing import Any

from oioioi.sioworkers.jobs import send_async_jobs

#: Fields the evaluation manager keeps for itself; sioworkersd never sees them.
_STRIPPED_FIELDS = ["recipe", "error_handlers"]


def restore_job(saved_environ: dict[str, Any], resuming_environ: dict[str, Any]) -> dict[str, Any]:
    """Merge the environ returned by sioworkersd into the saved one."""
    for field in _STRIPPED_FIELDS:
        if field in resuming_environ:
            raise RuntimeError(f"Resuming environ contains stripped field {field}.")
    saved_environ.update(resuming_environ)
    return saved_environ


def transfer_job(environ: dict[str, Any]) -> None:
    """Strip what sioworkersd doesn't need and send the job group; the environ is already saved."""
    for field in _STRIPPED_FIELDS:
        environ.pop(field, None)
    send_async_jobs(environ)
