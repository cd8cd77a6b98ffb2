"""Resuming jobs with their results: upstream's ``delay_environ``, set-based and with a durable
hand-off instead of a Celery publish inside the transaction.

:func:`delay_environs` does, for each environ of a list, in order and inside the caller's
transaction, what upstream's ``delay_environ`` does: lock and delete the job's ``SavedEnviron``,
merge the result into it with the saved ``restore_environ_func``, mark the job QUEUED (or drop a
CANCELLED one) and hand the resumed environ on. The hand-off is a row written in the same
transaction (:mod:`oioioi.workers.dispatch`), so it commits or rolls back with the resume; upstream
publishes ``evalmgr_job`` to Celery before the commit, so that a commit that then fails leaves a
task running a resume that never happened, and a task lost after the commit leaves the job QUEUED
for ever.

It uses upstream's tables and restore functions as they are, with a few statements for the whole
list. Where sharing statements could change an outcome (two environs of one job in a list) the
environs are queued one after another, each seeing what the one before did.

One thing it does differently: an environ whose ``saved_environ_id`` is the saved environ of
another job is refused (upstream resumes that other job with it).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from typing import Any

from django.utils.module_loading import import_string

from consumer import environ
from consumer.environ import RawEnviron
from consumer.errors import MismatchedEnviron
from oioioi.evalmgr.models import SavedEnviron
from oioioi.workers.dispatch import Dispatcher, get_dispatcher
from oioioi.workers.jobs import CANCELLED, distinct_jobs, lock_jobs, set_states
from oioioi.workers.sql import can_delete_plainly, chunks, delete_in, select_in
from oioioi.workers.transactions import require_transaction

log = logging.getLogger(__name__)

#: Restore functions that merge the result into the saved environ field by field, looking at
#: nothing but the fields' names: upstream's for sioworkers jobs refuses a result carrying
#: ``recipe`` or ``error_handlers`` and ``update``-s the saved environ with it. These are given
#: the fields' JSON texts, so nothing of either environ is decoded; any other restore function
#: (Zeus's reads values) gets both environs decoded.
MERGING_RESTORE_FUNCS = frozenset({"oioioi.sioworkers.handlers.restore_job"})

Environ = MutableMapping[str, Any]


def _lock_saved_environs(ids: Collection[int]) -> dict[int, tuple[str, str]]:
    """Lock the saved environs (in id order); returns each one's job id and JSON by id."""
    if not ids:
        return {}
    rows = select_in(
        SavedEnviron, ["id", "queued_job", "environ"], "id", sorted(set(ids)), lock=True
    )
    return {pk: (job_id, text) for pk, job_id, text in rows}


def _refuse_mismatches(environs: Sequence[Environ], saved: Mapping[int, tuple[str, str]]) -> None:
    """Raise :class:`~consumer.errors.MismatchedEnviron` for the first environ whose saved
    environ is another job's, before anything is changed.

    Upstream's ``_resume_job`` would merge such a result into the other job's environ and queue
    that job, leaving the named one waiting for ever without its saved environ. A saved environ
    that is gone is not refused: the job was resumed already (or deleted), as upstream says.
    """
    for env in environs:
        if "saved_environ_id" not in env:
            continue
        found = saved.get(env["saved_environ_id"])
        if found is not None and found[0] != env.get("job_id"):
            raise MismatchedEnviron(
                f"'saved_environ_id' {env['saved_environ_id']!r} is the saved environ of job "
                f"{found[0]!r}, not of {env.get('job_id')!r}"
            )


def _delete_saved_environs(ids: Collection[int]) -> None:
    if not ids:
        return
    if can_delete_plainly(SavedEnviron):
        delete_in(SavedEnviron, "id", list(ids))
    else:
        for part in chunks(sorted(ids)):
            SavedEnviron.objects.filter(id__in=part).delete()


@require_transaction
def delay_environs(environs: Sequence[Environ], *, run_here: bool = False) -> list[str | None]:
    """``delay_environ`` on each environ, in order, inside the caller's transaction.

    Returns the hand-off's handle for each (also written to the job's ``celery_task_id``), or None
    where the job was already resumed or was cancelled. Like ``delay_environ`` it pops
    ``saved_environ_id`` from the environs it is given. Unlike it, it refuses an environ whose
    ``saved_environ_id`` is another job's saved environ: it raises
    :class:`~consumer.errors.MismatchedEnviron` before changing anything (the caller's transaction
    is then to be rolled back). ``run_here`` tells the dispatcher that the caller runs the recipes
    itself after the commit (:meth:`~oioioi.workers.dispatch.Dispatcher.run_pending`).
    """
    results: list[str | None] = [None] * len(environs)
    locked = _lock_saved_environs(
        [env["saved_environ_id"] for env in environs if "saved_environ_id" in env]
    )
    _refuse_mismatches(environs, locked)
    _delete_saved_environs(locked)
    saved = {pk: text for pk, (_, text) in locked.items()}
    resumed: list[tuple[int, Environ]] = []
    for i, env in enumerate(environs):
        if "saved_environ_id" in env:
            saved_environ_id = env.pop("saved_environ_id")
            # Taken off the map: a second environ for the same saved environ finds it resumed,
            # as it would after the first one's delay_environ.
            text = saved.pop(saved_environ_id, None)
            if text is None:
                log.info("Job with environ id %r already resumed, ignoring.", saved_environ_id)
                continue
            env = _restore(text, env)
        resumed.append((i, env))
    if distinct_jobs([env for _, env in resumed]):
        groups = [resumed]
    else:
        # Two environs of one job: the second must see what the first did to it.
        groups = [[item] for item in resumed]
    for group in groups:
        handles = _queue([env for _, env in group], run_here)
        for (i, _), handle in zip(group, handles, strict=True):
            results[i] = handle
    return results


def delay_environ(env: Environ, *, run_here: bool = False) -> str | None:
    """:func:`delay_environs` for one environ."""
    return delay_environs([env], run_here=run_here)[0]


def _restore(saved_text: str, env: Environ) -> Environ:
    """The saved environ's ``restore_environ_func`` applied to it and the result, as
    ``_resume_job`` applies it."""
    saved = environ.parse(saved_text)
    func = saved.pop("restore_environ_func")
    restore = import_string(func)
    if (
        func in MERGING_RESTORE_FUNCS
        and isinstance(saved, RawEnviron)
        and isinstance(env, RawEnviron)
    ):
        return RawEnviron(restore(saved.fields, env.fields))
    return restore(_decoded(saved), _decoded(env))  # type: ignore[no-any-return]


def _decoded(env: Mapping[str, Any]) -> dict[str, Any]:
    return env.to_dict() if isinstance(env, RawEnviron) else dict(env)


def _queue(environs: Sequence[Environ], run_here: bool) -> list[str | None]:
    """The rest of ``delay_environ`` for resumed environs of distinct jobs: mark them QUEUED
    (the state and the hand-off's handle in one statement) and hand them on."""
    if not environs:
        return []
    found = lock_jobs(environs)
    going = [env for env in environs if found.get(env["job_id"]) != CANCELLED]
    dispatcher = get_dispatcher()
    if isinstance(dispatcher, Dispatcher):
        handles = dispatcher.dispatch_many(going, run_here=run_here) if going else []
    else:
        # A dispatcher of another lineage may know only dispatch().
        handles = [dispatcher.dispatch(env) for env in going]
    task_ids = {env["job_id"]: h for env, h in zip(going, handles, strict=True)}
    set_states(going, found, "QUEUED", task_ids)
    return [task_ids.get(env["job_id"]) for env in environs]
