"""Running resumed recipes from durable runs: upstream's ``evalmgr_job``, checkpointed.

:func:`run_recipes` runs the recipes of many claimed runs: a phase of every job at a time, each
such round in one transaction with the checkpoints of all its jobs. :func:`run_one` is
``evalmgr_job(env)`` for one claimed run, made of the same steps for a batch of one. Either way
each phase is committed together with a checkpoint of the environ, so that a runner killed between
phases resumes after the last committed phase instead of running it again. The steps are written
once: the start (:func:`_begin`), a round (:func:`_round`) and the transfer's call after the commit
(:func:`_hand_over`); the two differ only in what a failure does. In a batch, the jobs of a round
that failed run again each on its own (:func:`run_one`), so that a failure is never charged to the
jobs that shared its round; on its own, the failure is the job's, and its error handlers run.

Both keep upstream's semantics for what a job sees: the same states in the same order, the same
error handlers (run with ``exc_info``; the exception propagates unless one set ``ignore_errors``),
Celery's :class:`~celery.exceptions.Ignore` stopping a job silently, and a transfer's call to the
external system made after the environ is saved and committed. Errors of the infrastructure
(:data:`INFRASTRUCTURE_ERRORS`) are not the job's: no error handler runs (they would delete a job
that did nothing wrong), and the run stays for a retry.

:func:`run_phase` and :func:`run_error_handlers` are upstream's private ``_run_phase`` and
``_run_error_handlers`` (``oioioi/evalmgr/tasks.py``) written again on purpose: upstream's private
names are no interface to import.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import pprint
import sys
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol, TypeVar

from celery.exceptions import Ignore
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from consumer.environ import RawEnviron, loads, parse
from oioioi.evalmgr.models import SavedEnviron
from oioioi.workers.errors import TRANSIENT_ERRORS
from oioioi.workers.jobs import delete_jobs, distinct_jobs, mark_jobs_state
from oioioi.workers.sql import insert_rows

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
ExcInfo = tuple[type[BaseException], BaseException, TracebackType]

__all__ = [
    "INFRASTRUCTURE_ERRORS",
    "Ignore",
    "LeaseLost",
    "outcome_logged",
    "run_one",
    "run_recipes",
]


class LeaseLost(Exception):
    """Raised by a run whose claim was taken over by another runner; its phase is rolled back."""


#: Errors of the infrastructure, not of the job: the run is left for a retry, and no error
#: handler runs.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (LeaseLost, *TRANSIENT_ERRORS)


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


class Run(Runs[K], Protocol[K]):
    """One claimed durable run, the runs of a batch of one: its key is ``pk``, and its
    :meth:`keep` raises :class:`LeaseLost` once the run was taken over."""

    pk: K


_controllers_loaded = False


def load_controllers() -> None:
    """Import every app's ``controllers`` module, once, before the first phase runs.

    Upstream's ``evalmgr_job`` does this so that contest controllers get their mix-ins before a
    recipe uses them; a runner outside Celery must do the same. The stand-in has no such loader.
    """
    global _controllers_loaded
    if _controllers_loaded:
        return
    try:
        from oioioi.base.utils.loaders import load_modules  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        load_modules("controllers")
    _controllers_loaded = True


def run_phase(
    env: dict[str, Any], phase: Any, extra_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Call one recipe entry ``(name, handler_path[, kwargs])`` on ``env``, as upstream does."""
    if len(phase) not in (2, 3):
        raise TypeError(f"Recipe element has length neither 2 nor 3: {phase!r}")
    name, handler_path = phase[0], phase[1]
    kwargs = dict(phase[2]) if len(phase) == 3 else {}
    if extra_kwargs:
        kwargs.update(extra_kwargs)
    result = import_string(handler_path)(env, **kwargs)
    if result is None:
        raise RuntimeError(
            f'Evaluation handler "{name}" ({handler_path}) forgot to return the environment.'
        )
    return result


def run_error_handlers(env: dict[str, Any], exc_info: ExcInfo) -> dict[str, Any]:
    """Run the environ's ``error_handlers`` with ``exc_info``; re-raise the error unless one of
    them set ``ignore_errors``."""
    log.debug("Handling exception %r in job:\n%s", exc_info[0], pprint.pformat(env, indent=4))
    try:
        for phase in env.get("error_handlers", []):
            env = run_phase(env, phase, extra_kwargs={"exc_info": exc_info})
    except Exception:
        log.error(
            "Exception in the job's error handlers:\n%s",
            pprint.pformat(env, indent=4),
            exc_info=True,
        )
    if not env.get("ignore_errors"):
        log.error("Exception in job %r.", env.get("job_id"), exc_info=exc_info)
        raise exc_info[1].with_traceback(exc_info[2])
    return env


def _can_start(env: Mapping[str, Any]) -> bool:
    """Whether ``evalmgr_job`` would run a phase of ``env`` rather than fail it at once."""
    return "job_id" in env and "recipe" in env and "error" not in env


def _refuse(env: dict[str, Any]) -> None:
    """Raise what ``evalmgr_job`` raises for an environ it cannot start."""
    if "job_id" not in env:
        raise RuntimeError("No job_id found in environ")
    if "recipe" not in env:
        raise RuntimeError(
            'No recipe found in job environment. Did you forget to set environ["run_externally"]?'
        )
    error = env["error"] if isinstance(env["error"], dict) else {"message": env["error"]}
    raise RuntimeError(
        "Error from workers:\n{}\nTB:\n{}".format(error.get("message"), error.get("traceback"))
    )


def _save_environs(environs: list[dict[str, Any]]) -> list[int]:
    """``SavedEnviron.save_environ`` for each (serialised as it serialises them), in one go."""
    now = timezone.now()
    rows = [(env["job_id"], json.dumps(env), now) for env in environs]
    return insert_rows(SavedEnviron, ["queued_job", "environ", "save_time"], rows, "queued_job")


def _transfer(env: dict[str, Any], transfer: dict[str, Any]) -> None:
    """Hand a parked job to the external system, after its save has committed; if that fails,
    forget the save and re-raise."""
    try:
        import_string(transfer["transfer_func"])(env, **transfer.get("transfer_kwargs", {}))
    except Exception:
        with transaction.atomic():
            SavedEnviron.objects.filter(id=env.pop("saved_environ_id")).delete()
        raise


# --- the steps, for a batch and for a run on its own ---------------------------------------------


def _begin(ready: Mapping[K, Mapping[str, Any]], runs: Runs[K]) -> tuple[list[K], list[K]]:
    """``evalmgr_job``'s start, in the caller's transaction: the jobs whose runs are still claimed
    go PROGRESS. Returns their keys, in order, and those of them whose job was cancelled (their
    runs ended)."""
    kept = runs.keep(ready)
    order = [key for key in ready if key in kept]
    marked = mark_jobs_state([ready[key] for key in order], "PROGRESS")
    cancelled = [key for key, ok in zip(order, marked, strict=True) if not ok]
    if cancelled:
        runs.finish(cancelled)
    return order, cancelled


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector paused for a round.

    Each job's environ is decoded just before its phase: tens of thousands of new lists and dicts
    for a large one, which the next collection would walk through (1.6 ms per 1 MB environ), only
    to find the tree that reference counting frees once the phase is done. What a phase leaves
    in cycles waits for the collection after the round.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _lost(wanted: Collection[Any], kept: Collection[Any]) -> None:
    for key in wanted:
        if key not in kept:
            log.warning("Run %r was taken over by another runner.", key)


Transfers = list[tuple[dict[str, Any], dict[str, Any]]]


def _round(
    active: dict[K, Mapping[str, Any]],
    snapshot: Mapping[K, str | bytes],
    runs: Runs[K],
    seen: dict[K, dict[str, Any]] | None = None,
) -> tuple[dict[K, Mapping[str, Any]], Mapping[K, str | bytes], Transfers, list[Any]]:
    """One phase of each job, committed together: returns the jobs that go on (and their
    checkpoints), the transfers to make now that the jobs are parked, and the ids of the jobs
    found cancelled as they were to be parked (their runs ended).

    An environ read at its top level only is decoded from its text in ``snapshot`` just before
    its phase, and the jobs that go on are read back from their checkpoints, so that the round
    holds one decoded environ at a time. With ``seen`` (a run on its own) each job's environ is
    kept there as the round last had it, for its error handlers if the round fails, and goes on
    as it is.
    """
    with transaction.atomic(), _collector_paused():
        kept = runs.keep(active)
        _lost(active, kept)
        going: dict[K, Mapping[str, Any]] = {}
        texts: dict[K, str] = {}
        finished: list[K] = []
        moving: dict[K, tuple[dict[str, Any], dict[str, Any]]] = {}
        for key in active:
            if key not in kept:
                continue
            # Decoded whole from its text in one go (the garbage collector paused for it).
            held = active[key]
            env: dict[str, Any] = (
                loads(snapshot[key]) if isinstance(held, RawEnviron) else _whole(held)
            )
            del held
            recipe = env.get("recipe")
            if recipe:
                env["recipe"] = recipe[1:]
                if seen is not None:
                    seen[key] = env
                env = run_phase(env, recipe[0])
            if seen is not None:
                seen[key] = env
            if "transfer" in env:
                # Saved without ``transfer``, as evalmgr_job saves it.
                moving[key] = (env, env.pop("transfer"))
            elif env.get("recipe"):
                # Its checkpoint; in a batch, the next round reads it back from that text.
                texts[key] = json.dumps(env)
                going[key] = env if seen is not None else parse(texts[key])
            else:
                finished.append(key)
            del env
        if finished:
            delete_jobs([active[key]["job_id"] for key in finished])
        transfers: Transfers = []
        cancelled: list[Any] = []
        if moving:
            keys = list(moving)
            marked = mark_jobs_state([moving[key][0] for key in keys], "WAITING")
            parked = [key for key, ok in zip(keys, marked, strict=True) if ok]
            saved_ids = _save_environs([moving[key][0] for key in parked])
            for key, saved_id in zip(parked, saved_ids, strict=True):
                env, transfer = moving[key]
                env["saved_environ_id"] = saved_id
                transfers.append((env, transfer))
            cancelled = [
                moving[key][0]["job_id"] for key, ok in zip(keys, marked, strict=True) if not ok
            ]
        if finished or moving:
            runs.finish([*finished, *moving])
        if texts:
            runs.checkpoint(texts)
    return going, texts, transfers, cancelled


def _hand_over(env: dict[str, Any], transfer: dict[str, Any]) -> dict[str, Any]:
    """A parked job's transfer, after its save has committed, as ``evalmgr_job`` makes it: if it
    fails, the save is forgotten and the job's error handlers run (an :class:`Ignore` stops the
    job silently). Its run ended with the save, so nothing would retry it: an error of the
    infrastructure here is the job's too."""
    try:
        _transfer(env, transfer)
    except Ignore:
        raise
    except Exception:
        return run_error_handlers(env, sys.exc_info())  # type: ignore[arg-type]
    return env


@contextmanager
def outcome_logged(job_id: Any) -> Iterator[None]:
    """Around a job's recipe (``evalmgr_job`` or :func:`run_one`): log how it ended when it ended
    by itself, cancelled (Celery's :class:`Ignore`) or failed in its recipe (its error handlers
    have run); an error of the infrastructure propagates (the run stays for a retry)."""
    try:
        yield
    except INFRASTRUCTURE_ERRORS:
        raise
    except Ignore:
        log.info("Job %r was cancelled; its run ended.", job_id)
    except Exception:
        log.exception("Job %r failed in its recipe.", job_id)


# --- one run -------------------------------------------------------------------------------------


def run_one(env: dict[str, Any], run: Run[K]) -> dict[str, Any]:
    """``evalmgr_job(env)`` for a claimed run, each phase committed with a checkpoint; returns the
    processed copy.

    The run is finished in the same transaction as the job's last step (its end, its transfer,
    or its cancellation); an error handled by the error handlers finishes it too.
    """
    load_controllers()
    key = run.pk
    seen = {key: copy.deepcopy(env)}
    try:
        transfers = _run_alone(key, seen, run)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Ignore:
        _end(key, run)
        raise
    except Exception:
        exc_info = sys.exc_info()
        try:
            return run_error_handlers(seen[key], exc_info)  # type: ignore[arg-type]
        finally:
            _end(key, run)
    if transfers is None:
        # Cancelled: its run ended with the job.
        raise Ignore
    for parked, transfer in transfers:
        return _hand_over(parked, transfer)
    return seen[key]


def _run_alone(key: K, seen: dict[K, dict[str, Any]], run: Run[K]) -> Transfers | None:
    """The rounds of a batch of one, until its job ends; returns its transfer (if it was parked),
    or None if the job was cancelled."""
    env = seen[key]
    if not _can_start(env):
        _refuse(env)
    with transaction.atomic():
        _, cancelled = _begin({key: env}, run)
    if cancelled:
        return None
    active: dict[K, Mapping[str, Any]] = {key: env}
    while True:
        active, _, transfers, parked_cancelled = _round(active, {}, run, seen)
        if parked_cancelled:
            return None
        if not active:
            return transfers


def _end(key: K, run: Run[K]) -> None:
    """End a run whose job stopped in a step (raising :class:`LeaseLost` if it was taken over)."""
    with transaction.atomic():
        run.keep([key])
        run.finish([key])


# --- many runs -----------------------------------------------------------------------------------


def run_recipes(
    environs: Mapping[K, str | bytes],
    runs: Runs[K],
    alone: Callable[[K, dict[str, Any]], None],
    *,
    parsed: Mapping[K, dict[str, Any]] | None = None,
) -> int:
    """Run the recipes of claimed runs (environ JSON by run) as :func:`run_one` does; returns how
    many runs it took. ``parsed`` may give environs already decoded from that JSON, which are then
    the runner's to change.

    The jobs go PROGRESS together, then run in rounds: one phase of every job still running, in
    one transaction that also checkpoints each, finishes the jobs left without a recipe and parks
    the ones a phase transferred. A transfer's call to the external system follows the commit.

    A job that ``evalmgr_job`` would stop before its first phase (no recipe, an error from the
    workers), or whose round fails because some phase raised, goes to ``alone(key, environ)``,
    which runs it on its own (:func:`run_one`) from its last committed state: a phase's failure is
    never charged to the jobs that shared its round. Errors of the infrastructure propagate; the
    runs stay claimed for the caller to retry.
    """
    load_controllers()
    # Read at their top level only: a job's environ is decoded whole just before its phase runs
    # and let go after it, so that the runner holds one decoded environ at a time (three times
    # its JSON) rather than the whole batch's.
    decoded = {
        key: parsed[key] if parsed is not None and key in parsed else parse(text)
        for key, text in environs.items()
    }
    ran = 0

    def on_its_own(key: K, env: dict[str, Any]) -> None:
        nonlocal ran
        ran += 1
        alone(key, env)

    ready: dict[K, Mapping[str, Any]] = {}
    for key, env in decoded.items():
        if _can_start(env):
            ready[key] = env
        else:
            on_its_own(key, _whole(env))
    if not ready:
        return ran
    if not distinct_jobs(list(ready.values())):
        for key, env in ready.items():
            on_its_own(key, _whole(env))
        return ran
    snapshot: Mapping[K, str | bytes] = {key: environs[key] for key in ready}
    try:
        with transaction.atomic():
            order, cancelled = _begin(ready, runs)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception:
        log.warning(
            "Marking a batch of jobs in progress failed; running them one by one.", exc_info=True
        )
        for key in ready:
            on_its_own(key, loads(snapshot[key]))
        return ran
    _lost(ready, set(order))
    ran += len(order)
    for key in cancelled:
        log.info("Job %r was cancelled; its run ended.", ready[key]["job_id"])
    active: dict[K, Mapping[str, Any]] = {
        key: ready[key] for key in order if key not in set(cancelled)
    }
    while active:
        try:
            active, snapshot, transfers, parked_cancelled = _round(active, snapshot, runs)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception:
            # Some phase raised (a bug, a cancelled job's Ignore): the round rolled back, so
            # every job of it starts again on its own from its last checkpoint, where a failure
            # is its own alone.
            for key in list(active):
                alone(key, loads(snapshot[key]))
            return ran
        for job_id in parked_cancelled:
            log.info("Job %r was cancelled; its run ended.", job_id)
        for env, transfer in transfers:
            try:
                _hand_over(env, transfer)
            except Ignore:
                log.info("Job %r was cancelled; its run ended.", env.get("job_id"))
            except Exception:
                log.exception("Job %r failed in its recipe.", env.get("job_id"))
    return ran


def _whole(env: Mapping[str, Any]) -> dict[str, Any]:
    """An environ read at its top level decoded whole (the runner's to change); a dict as it is."""
    return env.to_dict() if isinstance(env, RawEnviron) else env  # type: ignore[return-value]
