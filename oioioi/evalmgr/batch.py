"""Set-based forms of the evaluation manager's steps, for callers that apply many jobs at once.

Per job, :func:`~oioioi.evalmgr.tasks.delay_environ` issues six statements and
:func:`~oioioi.evalmgr.tasks.evalmgr_job` seven in three transactions; on a busy judge that is
most of what the return path costs. The functions here do the same for a list of jobs with a
few statements for the whole list:

- :func:`mark_jobs_state` is :func:`~oioioi.evalmgr.utils.mark_job_state` for many jobs;
- :func:`delay_environs` is ``delay_environ`` called on each environ, one after another, in the
  caller's transaction;
- :func:`run_recipes` is ``evalmgr_job(env, run)`` for many claimed runs: a phase of every job at
  a time, each such round in one transaction with the checkpoints of all its jobs.

What a job sees is the same: the same states in the same order, each phase committed together
with its checkpoint, the same answer to a cancelled or already-resumed job. What is shared is only
the commit. Where sharing could change an outcome (two environs of one job in a list, a phase
that raises) the jobs concerned go through the one-job functions instead.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from django.db import connection, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.evalmgr.sql import (
    MAX_KEYS,
    can_delete_plainly,
    delete_in,
    insert_returning,
    select_in,
    update_each,
    update_in,
)
from oioioi.evalmgr.tasks import (
    INFRASTRUCTURE_ERRORS,
    _run_error_handlers,
    _run_phase,
)
from oioioi.evalmgr.utils import require_transaction

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


def _chunks(items: Sequence[Any], size: int = MAX_KEYS) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _submission_id(environ: dict[str, Any]) -> int | None:
    value = environ.get("submission_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _distinct_jobs(environs: Sequence[dict[str, Any]]) -> bool:
    job_ids = [env["job_id"] for env in environs]
    return len(set(job_ids)) == len(job_ids)


# --- job states ----------------------------------------------------------------------------------


@require_transaction
def mark_jobs_state(environs: Sequence[dict[str, Any]], state: str) -> list[bool]:
    """:func:`~oioioi.evalmgr.utils.mark_job_state` for environs of distinct jobs.

    Returns, for each environ, whether its job goes on (False: it was CANCELLED, and its
    ``QueuedJob`` is deleted). The jobs' rows are locked in ``job_id`` order, so that two callers
    with overlapping lists cannot deadlock on them.
    """
    found = _lock_jobs(environs)
    going = [env for env in environs if found.get(env["job_id"]) != _CANCELLED]
    _set_states(going, found, state)
    return [found.get(env["job_id"]) != _CANCELLED for env in environs]


_CANCELLED = ("CANCELLED", None)


def _lock_jobs(environs: Sequence[dict[str, Any]]) -> dict[str, tuple[str, int | None]]:
    """Lock the environs' jobs and read their state and submission; a CANCELLED job is deleted
    (as ``mark_job_state`` deletes it) and maps to :data:`_CANCELLED`."""
    if not _distinct_jobs(environs):
        raise ValueError("the environs must be of distinct jobs")
    rows = select_in(
        QueuedJob,
        ["job_id", "state", "submission_id"],
        "job_id",
        [env["job_id"] for env in environs],
        lock=True,
    )
    found: dict[str, tuple[str, int | None]] = {job_id: (st, sid) for job_id, st, sid in rows}
    cancelled = sorted(job_id for job_id, (st, _) in found.items() if st == "CANCELLED")
    if cancelled:
        QueuedJob.objects.filter(job_id__in=cancelled).delete()
        for job_id in cancelled:
            log.info("Job %r cancelled.", job_id)
            found[job_id] = _CANCELLED
    return found


def _set_states(
    environs: Sequence[dict[str, Any]],
    found: Mapping[str, tuple[str, int | None]],
    state: str,
    task_ids: Mapping[str, str] | None = None,
) -> None:
    """Give the jobs of ``environs`` (none cancelled) ``state``, and the task ids if given,
    creating the ones not in ``found``."""
    present = sorted(env["job_id"] for env in environs if env["job_id"] in found)
    if task_ids is not None:
        update_each(
            QueuedJob,
            "job_id",
            "celery_task_id",
            {job_id: task_ids[job_id] for job_id in present},
            also={"state": state},
        )
    elif present:
        update_in(QueuedJob, "job_id", present, {"state": state})
    missing = [env for env in environs if env["job_id"] not in found]
    if missing:
        QueuedJob.objects.bulk_create(
            [
                QueuedJob(
                    job_id=env["job_id"],
                    state=state,
                    submission_id=_submission_id(env),
                    celery_task_id=task_ids.get(env["job_id"]) if task_ids else None,
                )
                for env in missing
            ]
        )
    for env in environs:
        # mark_job_state also sets the submission, which does not change in practice.
        job_id, submission_id = env["job_id"], _submission_id(env)
        if job_id in found and submission_id is not None and found[job_id][1] != submission_id:
            QueuedJob.objects.filter(job_id=job_id).update(submission_id=submission_id)


def _delete_jobs(job_ids: Sequence[str]) -> None:
    """Delete finished jobs (and any saved environ left of them), as ``_job_finished`` does."""
    if not (
        can_delete_plainly(QueuedJob, but_for=[SavedEnviron]) and can_delete_plainly(SavedEnviron)
    ):
        for part in _chunks(sorted(job_ids)):
            QueuedJob.objects.filter(job_id__in=part).delete()
        return
    # What the collector would do, without its SELECT of every row it deletes.
    delete_in(SavedEnviron, "queued_job", job_ids)
    delete_in(QueuedJob, "job_id", job_ids)


# --- resuming ------------------------------------------------------------------------------------


def _take_saved_environs(ids: Collection[int]) -> dict[int, str]:
    """Lock the saved environs (in id order), delete them, and return their JSON by id."""
    if not ids:
        return {}
    rows = select_in(SavedEnviron, ["id", "environ"], "id", sorted(set(ids)), lock=True)
    taken: dict[int, str] = {pk: text for pk, text in rows}
    if not taken:
        return taken
    if can_delete_plainly(SavedEnviron):
        delete_in(SavedEnviron, "id", list(taken))
    else:
        for part in _chunks(sorted(taken)):
            SavedEnviron.objects.filter(id__in=part).delete()
    return taken


@require_transaction
def delay_environs(
    environs: Sequence[dict[str, Any]], *, run_here: bool = False
) -> list[str | None]:
    """``delay_environ`` on each environ, in order, inside the caller's transaction.

    Returns the dispatcher's handle for each, or None where the job was already resumed or was
    cancelled. Like ``delay_environ`` it pops ``saved_environ_id`` from the environs it is given.
    ``run_here`` tells the dispatcher that the caller runs the recipes itself after the commit
    (:meth:`~oioioi.evalmgr.dispatch.Dispatcher.run_pending`).
    """
    results: list[str | None] = [None] * len(environs)
    saved = _take_saved_environs(
        [env["saved_environ_id"] for env in environs if "saved_environ_id" in env]
    )
    resumed: list[tuple[int, dict[str, Any]]] = []
    for i, env in enumerate(environs):
        if "saved_environ_id" in env:
            saved_environ_id = env.pop("saved_environ_id")
            # Taken off the map: a second environ for the same saved environ finds it resumed,
            # as it would after the first one's delay_environ.
            text = saved.pop(saved_environ_id, None)
            if text is None:
                log.info("Job with environ id %r already resumed, ignoring.", saved_environ_id)
                continue
            saved_environ = json.loads(text)
            restore = import_string(saved_environ.pop("restore_environ_func"))
            env = restore(saved_environ, env)
        resumed.append((i, env))
    if _distinct_jobs([env for _, env in resumed]):
        groups = [resumed]
    else:
        # Two environs of one job: the second must see what the first did to it.
        groups = [[item] for item in resumed]
    for group in groups:
        handles = _queue([env for _, env in group], run_here)
        for (i, _), handle in zip(group, handles, strict=True):
            results[i] = handle
    return results


def _queue(environs: Sequence[dict[str, Any]], run_here: bool) -> list[str | None]:
    """The rest of ``delay_environ`` for resumed environs of distinct jobs: mark them QUEUED
    (the state and the dispatcher's handle in one statement) and dispatch them."""
    from oioioi.evalmgr.dispatch import Dispatcher, get_dispatcher

    if not environs:
        return []
    found = _lock_jobs(environs)
    going = [env for env in environs if found.get(env["job_id"]) != _CANCELLED]
    dispatcher = get_dispatcher()
    if isinstance(dispatcher, Dispatcher):
        handles = dispatcher.dispatch_many(going, run_here=run_here) if going else []
    else:
        # A dispatcher of another lineage may know only dispatch().
        handles = [dispatcher.dispatch(env) for env in going]
    task_ids = {env["job_id"]: h for env, h in zip(going, handles, strict=True)}
    _set_states(going, found, "QUEUED", task_ids)
    return [task_ids.get(env["job_id"]) for env in environs]


# --- running recipes -----------------------------------------------------------------------------


class Runs(Protocol[K]):
    """The claimed durable runs of one batch; every method runs in the caller's transaction."""

    def keep(self, keys: Collection[K]) -> set[K]:
        """Lock the runs still claimed by this batch; the others were taken over by another
        runner (their claim had expired)."""
        ...

    def checkpoint(self, environs: Mapping[K, str]) -> None:
        """Save each run's environ (JSON) as of the phase just run."""
        ...

    def finish(self, keys: Collection[K]) -> None:
        """End the runs (their jobs finished, were transferred or were cancelled)."""
        ...


def _save_environs(environs: Sequence[dict[str, Any]]) -> list[int]:
    """``SavedEnviron.save_environ`` for each, with one statement where the database allows."""
    if not connection.features.can_return_rows_from_bulk_insert:
        return [SavedEnviron.save_environ(env).id for env in environs]
    now = timezone.now()
    rows = [(env["job_id"], json.dumps(env), now) for env in environs]
    created = insert_returning(
        SavedEnviron, ["queued_job", "environ", "save_time"], rows, ["queued_job", "id"]
    )
    id_of = dict(created)
    return [id_of[env["job_id"]] for env in environs]


def run_recipes(
    environs: Mapping[K, str],
    runs: Runs[K],
    alone: Callable[[K, dict[str, Any]], None],
    *,
    parsed: Mapping[K, dict[str, Any]] | None = None,
) -> int:
    """Run the recipes of claimed runs (environ JSON by run) as ``evalmgr_job(env, run)`` does;
    returns how many runs it took. ``parsed`` may give environs already decoded from that JSON,
    which are then the runner's to change.

    The jobs go PROGRESS together, then run in rounds: one phase of every job still running, in
    one transaction that also checkpoints each, finishes the jobs left without a recipe and parks
    the ones a phase transferred. A transfer's call to the external system follows the commit.

    A job that ``evalmgr_job`` would stop before its first phase (no recipe, an error from the
    workers), or whose round fails because some phase raised, goes to ``alone(key, environ)``,
    which runs it on its own from its last committed state: a phase's failure is never charged
    to the jobs that shared its round. Errors of the infrastructure propagate; the runs stay
    claimed for the caller to retry.
    """
    ran = 0

    def on_its_own(key: K, env: dict[str, Any]) -> None:
        nonlocal ran
        ran += 1
        alone(key, env)

    ready: dict[K, dict[str, Any]] = {}
    for key, text in environs.items():
        env = parsed[key] if parsed is not None and key in parsed else json.loads(text)
        if "job_id" in env and "recipe" in env and "error" not in env:
            ready[key] = env
        else:
            on_its_own(key, env)
    if not ready:
        return ran
    if not _distinct_jobs(list(ready.values())):
        for key, env in ready.items():
            on_its_own(key, env)
        return ran
    snapshot = {key: environs[key] for key in ready}
    try:
        with transaction.atomic():
            kept = runs.keep(ready)
            order = [key for key in ready if key in kept]
            marked = mark_jobs_state([ready[key] for key in order], "PROGRESS")
            cancelled = [key for key, ok in zip(order, marked, strict=True) if not ok]
            if cancelled:
                runs.finish(cancelled)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception:
        log.warning(
            "Marking a batch of jobs in progress failed; running them one by one.", exc_info=True
        )
        for key in ready:
            on_its_own(key, json.loads(snapshot[key]))
        return ran
    _lost(ready, kept)
    ran += len(order)
    for key in cancelled:
        log.info("Job %r was cancelled; its run ended.", ready[key]["job_id"])
    active = {key: ready[key] for key in order if key not in set(cancelled)}
    while active:
        try:
            active, snapshot, transfers = _round(active, snapshot, runs)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception:
            # Some phase raised (a bug, a cancelled job's Ignore): the round rolled back, so
            # every job of it starts again on its own from its last checkpoint, where a failure
            # is its own alone.
            for key in list(active):
                alone(key, json.loads(snapshot[key]))
            return ran
        for env, transfer in transfers:
            _transfer(env, transfer)
    return ran


def _lost(wanted: Collection[Any], kept: Collection[Any]) -> None:
    for key in wanted:
        if key not in kept:
            log.warning("Run %r was taken over by another runner.", key)


def _round(
    active: dict[K, dict[str, Any]], snapshot: dict[K, str], runs: Runs[K]
) -> tuple[dict[K, dict[str, Any]], dict[K, str], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """One phase of each job, committed together: returns the jobs that go on (and their
    checkpoints), and the transfers to make now that the jobs are parked."""
    with transaction.atomic():
        kept = runs.keep(active)
        _lost(active, kept)
        going: dict[K, dict[str, Any]] = {}
        finished: list[K] = []
        moving: dict[K, tuple[dict[str, Any], dict[str, Any]]] = {}
        for key in active:
            if key not in kept:
                continue
            env = active[key]
            recipe = env.get("recipe")
            if recipe:
                env["recipe"] = recipe[1:]
                env = _run_phase(env, recipe[0])
            if "transfer" in env:
                # Saved without ``transfer``, as evalmgr_job saves it.
                moving[key] = (env, env.pop("transfer"))
            elif env.get("recipe"):
                going[key] = env
            else:
                finished.append(key)
        if finished:
            _delete_jobs([active[key]["job_id"] for key in finished])
        transfers: list[tuple[dict[str, Any], dict[str, Any]]] = []
        if moving:
            keys = list(moving)
            marked = mark_jobs_state([moving[key][0] for key in keys], "WAITING")
            parked = [key for key, ok in zip(keys, marked, strict=True) if ok]
            saved_ids = _save_environs([moving[key][0] for key in parked])
            for key, saved_id in zip(parked, saved_ids, strict=True):
                env, transfer = moving[key]
                env["saved_environ_id"] = saved_id
                transfers.append((env, transfer))
            for key, ok in zip(keys, marked, strict=True):
                if not ok:
                    log.info("Job %r was cancelled; its run ended.", moving[key][0]["job_id"])
        if finished or moving:
            runs.finish([*finished, *moving])
        texts = {key: json.dumps(env) for key, env in going.items()}
        if texts:
            runs.checkpoint(texts)
    return going, texts, transfers


def _transfer(env: dict[str, Any], transfer: dict[str, Any]) -> None:
    """The part of ``_transfer_job`` after the commit: hand the saved job to the external system."""
    try:
        import_string(transfer["transfer_func"])(env, **transfer.get("transfer_kwargs", {}))
    except Exception:
        exc_info = sys.exc_info()
        with transaction.atomic():
            SavedEnviron.objects.filter(id=env.pop("saved_environ_id")).delete()
        try:
            _run_error_handlers(env, exc_info)  # type: ignore[arg-type]
        except Exception:
            log.exception("Job %r failed in its recipe.", env.get("job_id"))
