"""Stand-in for upstream OIOIOI's ``oioioi.evalmgr.tasks``: the same public functions, behaving alike.

An environ is a JSON dict; its ``recipe`` is a list of ``(name, handler_path[, kwargs])`` phases run
in order by :func:`evalmgr_job`, a Celery task. A phase may hand the job to an external system with
:func:`transfer_job`; the job then waits (state WAITING, environ parked in a ``SavedEnviron``) until
:func:`delay_environ` is called with the external system's result, which resumes it and queues
:func:`evalmgr_job` for the rest of the recipe.

This module is upstream's API as the return path sees it, for standalone runs and the fast tests;
nothing of the return path lives here (see :mod:`oioioi.workers`). Like upstream,
:func:`delay_environ` publishes the Celery task *inside* the caller's transaction and returns its
``AsyncResult``; a phase raises Celery's :class:`~celery.exceptions.Ignore` to stop a job silently.
"""

from __future__ import annotations

import copy
import logging
import pprint
import sys
from typing import Any
from uuid import uuid4

from celery import shared_task
from celery.exceptions import Ignore
from django.db import transaction
from django.utils.module_loading import import_string

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.evalmgr.utils import mark_job_state, require_transaction

__all__ = [
    "Ignore",
    "add_after_placeholder",
    "add_after_recipe_entry",
    "add_before_placeholder",
    "add_before_recipe_entry",
    "create_environ",
    "delay_environ",
    "evalmgr_job",
    "extend_after_placeholder",
    "extend_before_placeholder",
    "find_recipe_entry",
    "recipe_placeholder",
    "replace_recipe_entry",
    "transfer_job",
]

log = logging.getLogger(__name__)

_PLACEHOLDER = "oioioi.evalmgr.tasks._placeholder"


def _placeholder(environ: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return environ


def recipe_placeholder(name: str) -> tuple[str, str]:
    return (name, _PLACEHOLDER)


def find_recipe_entry(recipe: list[Any], name: str) -> int:
    for i, entry in enumerate(recipe):
        if entry[0] == name:
            return i
    raise IndexError(f"Entry {name!r} not found in recipe")


def _find_placeholder(recipe: list[Any], name: str) -> int:
    for i, entry in enumerate(recipe):
        if entry[0] == name and entry[1] == _PLACEHOLDER:
            return i
    raise IndexError(f"Placeholder {name!r} not found in recipe")


def add_after_placeholder(environ: dict[str, Any], name: str, entry: Any) -> None:
    recipe = environ["recipe"]
    recipe.insert(_find_placeholder(recipe, name) + 1, entry)


def add_before_placeholder(environ: dict[str, Any], name: str, entry: Any) -> None:
    recipe = environ["recipe"]
    recipe.insert(_find_placeholder(recipe, name), entry)


def extend_after_placeholder(environ: dict[str, Any], name: str, entries: list[Any]) -> None:
    recipe = environ["recipe"]
    index = _find_placeholder(recipe, name) + 1
    recipe[index:index] = entries


def extend_before_placeholder(environ: dict[str, Any], name: str, entries: list[Any]) -> None:
    recipe = environ["recipe"]
    index = _find_placeholder(recipe, name)
    recipe[index:index] = entries


def add_after_recipe_entry(environ: dict[str, Any], name: str, entry: Any) -> None:
    recipe = environ["recipe"]
    recipe.insert(find_recipe_entry(recipe, name) + 1, entry)


def add_before_recipe_entry(environ: dict[str, Any], name: str, entry: Any) -> None:
    recipe = environ["recipe"]
    recipe.insert(find_recipe_entry(recipe, name), entry)


def replace_recipe_entry(environ: dict[str, Any], name: str, new_entry: Any) -> None:
    recipe = environ["recipe"]
    recipe[find_recipe_entry(recipe, name)] = new_entry


def create_environ() -> dict[str, Any]:
    """A new environ with the fields that must not be overwritten: ``job_id``, ``error_handlers``."""
    return {
        "job_id": uuid4().urn,
        "error_handlers": [
            ("remove_queuedjob_on_error", "oioioi.evalmgr.handlers.remove_queuedjob_on_error")
        ],
    }


def transfer_job(
    environ: dict[str, Any],
    transfer_func: str,
    restore_func: str,
    transfer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Mark the environ for transfer to an external system; returned by a recipe phase.

    The manager saves the environ (state WAITING), adds ``saved_environ_id`` and calls
    ``transfer_func(environ, **transfer_kwargs)`` outside any transaction. The external system's
    result later comes back to :func:`delay_environ`, which merges it as
    ``restore_func(saved_environ, result_environ)``.
    """
    if "transfer" in environ:
        raise RuntimeError(
            f"Tried to transfer environ again, with {transfer_func}({transfer_kwargs!r})"
        )
    environ["transfer"] = {
        "transfer_func": transfer_func,
        "transfer_kwargs": transfer_kwargs or {},
    }
    environ["restore_environ_func"] = restore_func
    return environ


def _run_phase(
    env: dict[str, Any], phase: Any, extra_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
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


@require_transaction
def _resume_job(environ: dict[str, Any]) -> dict[str, Any] | None:
    """Merge a result into its SavedEnviron and delete it; None when it was already resumed."""
    saved_environ_id = environ.pop("saved_environ_id")
    saved = SavedEnviron.objects.select_for_update().filter(id=saved_environ_id).first()
    if saved is None:
        log.info("Job with environ id %r already resumed, ignoring.", saved_environ_id)
        return None
    saved_environ = saved.load_environ()
    saved.delete()
    restore = import_string(saved_environ.pop("restore_environ_func"))
    return restore(saved_environ, environ)


@require_transaction
def delay_environ(environ: dict[str, Any], **evalmgr_extra_args: Any) -> Any:
    """Queue an environ for :func:`evalmgr_job`, resuming it first if it carries
    ``saved_environ_id``. Must be called inside a transaction.

    Returns the task's ``AsyncResult``, or None when the job was already resumed or was cancelled.
    As upstream, the task is published before the caller's transaction commits.
    """
    if "saved_environ_id" in environ:
        resumed = _resume_job(environ)
        if resumed is None:
            return None
        environ = resumed
    if not mark_job_state(environ, "QUEUED"):
        return None
    async_result = evalmgr_job.apply_async((environ,), **evalmgr_extra_args)
    QueuedJob.objects.filter(job_id=environ["job_id"]).update(celery_task_id=async_result.id)
    return async_result


def _mark_job_state(environ: dict[str, Any], state: str) -> None:
    with transaction.atomic():
        marked = mark_job_state(environ, state)
    if not marked:
        raise Ignore


def _job_finished(environ: dict[str, Any]) -> dict[str, Any]:
    with transaction.atomic():
        QueuedJob.objects.filter(job_id=environ["job_id"]).delete()
    return environ


def _transfer_job(
    environ: dict[str, Any], transfer_func: str, transfer_kwargs: dict[str, Any]
) -> dict[str, Any]:
    with transaction.atomic():
        marked = mark_job_state(environ, "WAITING")
        if marked:
            # Saved without ``transfer`` (popped by the caller) or ``saved_environ_id``.
            environ["saved_environ_id"] = SavedEnviron.save_environ(environ).id
    if not marked:
        raise Ignore
    try:
        import_string(transfer_func)(environ, **transfer_kwargs)
    except Exception:
        with transaction.atomic():
            SavedEnviron.objects.filter(id=environ.pop("saved_environ_id")).delete()
        raise
    return environ


def _run_error_handlers(env: dict[str, Any], exc_info: Any) -> dict[str, Any]:
    log.debug("Handling exception %r in job:\n%s", exc_info[0], pprint.pformat(env, indent=4))
    try:
        for phase in env.get("error_handlers", []):
            env = _run_phase(env, phase, extra_kwargs={"exc_info": exc_info})
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


@shared_task
def evalmgr_job(env: dict[str, Any]) -> dict[str, Any]:
    """Run an environ's recipe until it finishes or is transferred; returns the processed copy.

    Don't queue this directly; use :func:`delay_environ`. Phases run in order, each receiving the
    environ the previous one returned. On an exception other than :class:`Ignore` the
    ``error_handlers`` run with ``exc_info``, and the exception propagates unless one of them set
    ``ignore_errors``; an :class:`Ignore` stops the job and propagates to Celery.
    """
    env = copy.deepcopy(env)
    try:
        if "job_id" not in env:
            raise RuntimeError("No job_id found in environ")
        if "recipe" not in env:
            raise RuntimeError(
                'No recipe found in job environment. Did you forget to set environ["run_externally"]?'
            )
        if "error" in env:
            raise RuntimeError(
                "Error from workers:\n{}\nTB:\n{}".format(
                    env["error"]["message"], env["error"]["traceback"]
                )
            )
        _mark_job_state(env, "PROGRESS")
        while True:
            recipe = env.get("recipe")
            if not recipe:
                return _job_finished(env)
            phase = recipe[0]
            env["recipe"] = recipe[1:]
            env = _run_phase(env, phase)
            if "transfer" in env:
                return _transfer_job(env, **env.pop("transfer"))
    except Ignore:
        raise
    except Exception:
        return _run_error_handlers(env, sys.exc_info())
