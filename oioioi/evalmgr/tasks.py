"""The evaluation manager's public functions, named and behaving as upstream OIOIOI's.

An environ is a JSON dict; its ``recipe`` is a list of ``(name, handler_path[, kwargs])`` phases run
in order by :func:`evalmgr_job`. A phase may hand the job to an external system with
:func:`transfer_job`; the job then waits (state WAITING, environ parked in a ``SavedEnviron``) until
:func:`delay_environ` is called with the external system's result, which resumes it.

Two departures from upstream, both about durability rather than behaviour:

- upstream hands the resumed environ to Celery; here :func:`delay_environ` hands it to the
  dispatcher named by ``settings.EVALMGR_DISPATCHER`` *inside the same transaction*, and the
  dispatcher runs it after the commit (see :mod:`oioioi.evalmgr.dispatch`);
- when the runner is given a ``run`` (a claimed pending run), each phase commits together with a
  checkpoint of the environ, so a crash between phases resumes after the last committed phase
  instead of running it again.
"""

from __future__ import annotations

import copy
import logging
import pprint
import sys
from types import TracebackType
from typing import Any, Protocol
from uuid import uuid4

from django.db import InterfaceError, OperationalError, transaction
from django.utils.module_loading import import_string

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.evalmgr.utils import mark_job_state, require_transaction

log = logging.getLogger(__name__)

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]


class Ignore(Exception):
    """Raised by a phase (or the manager) to stop a job silently: it was cancelled or superseded."""


class LeaseLost(Exception):
    """Raised by a run whose claim was taken over by another runner; its phase is rolled back."""


#: Errors of the infrastructure, not of the job: the run is left for a retry, and no error
#: handler runs (they would delete a job that has done nothing wrong).
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    LeaseLost,
    OperationalError,
    InterfaceError,
)


class Run(Protocol):
    """A claimed durable run; its writes must happen inside the caller's transaction."""

    def checkpoint(self, environ: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


def _placeholder(environ: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return environ


def recipe_placeholder(name: str) -> tuple[str, str]:
    return (name, "oioioi.evalmgr.tasks._placeholder")


def find_recipe_entry(recipe: list[Any], name: str) -> int:
    for i, entry in enumerate(recipe):
        if entry[0] == name:
            return i
    raise IndexError(f"Entry {name!r} not found in recipe")


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
def delay_environ(environ: dict[str, Any], **evalmgr_extra_args: Any) -> str | None:
    """Queue an environ for the recipe runner, resuming it first if it carries ``saved_environ_id``.

    Must be called inside a transaction. Returns the dispatcher's handle, or None when the job was
    already resumed or was cancelled (then nothing else happens).
    """
    if "saved_environ_id" in environ:
        resumed = _resume_job(environ)
        if resumed is None:
            return None
        environ = resumed
    if not mark_job_state(environ, "QUEUED"):
        return None
    from oioioi.evalmgr.dispatch import get_dispatcher

    handle = get_dispatcher().dispatch(environ, **evalmgr_extra_args)
    QueuedJob.objects.filter(job_id=environ["job_id"]).update(celery_task_id=handle)
    return handle


def _mark_job_state(environ: dict[str, Any], state: str) -> None:
    with transaction.atomic():
        marked = mark_job_state(environ, state)
    if not marked:
        raise Ignore


def _job_finished(environ: dict[str, Any], run: Run | None) -> dict[str, Any]:
    with transaction.atomic():
        QueuedJob.objects.filter(job_id=environ["job_id"]).delete()
        if run is not None:
            run.finish()
    return environ


def _transfer_job(
    environ: dict[str, Any],
    transfer_func: str,
    transfer_kwargs: dict[str, Any],
    run: Run | None,
) -> dict[str, Any]:
    with transaction.atomic():
        marked = mark_job_state(environ, "WAITING")
        if marked:
            # Saved without ``transfer`` (popped by the caller) or ``saved_environ_id``.
            environ["saved_environ_id"] = SavedEnviron.save_environ(environ).id
        if run is not None:
            run.finish()
    if not marked:
        raise Ignore
    try:
        import_string(transfer_func)(environ, **transfer_kwargs)
    except Exception:
        with transaction.atomic():
            SavedEnviron.objects.filter(id=environ.pop("saved_environ_id")).delete()
        raise
    return environ


def _run_error_handlers(env: dict[str, Any], exc_info: ExcInfo) -> dict[str, Any]:
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


def evalmgr_job(env: dict[str, Any], run: Run | None = None) -> dict[str, Any]:
    """Run an environ's recipe until it finishes or is transferred; returns the processed copy.

    Don't call this to queue an environ; use :func:`delay_environ`. Phases run in order, each
    receiving the environ the previous one returned. On an exception other than :class:`Ignore`
    the ``error_handlers`` run with ``exc_info``, and the exception propagates unless one of them
    set ``ignore_errors``. With ``run``, each phase commits together with a checkpoint of the
    environ, and the run is finished in the same transaction as the job's last step.
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
            error = env["error"] if isinstance(env["error"], dict) else {"message": env["error"]}
            raise RuntimeError(
                "Error from workers:\n{}\nTB:\n{}".format(
                    error.get("message"), error.get("traceback")
                )
            )
        _mark_job_state(env, "PROGRESS")
        while True:
            recipe = env.get("recipe")
            if not recipe:
                return _job_finished(env, run)
            with transaction.atomic():
                phase = recipe[0]
                env["recipe"] = recipe[1:]
                env = _run_phase(env, phase)
                if run is not None and "transfer" not in env:
                    run.checkpoint(env)
            if "transfer" in env:
                return _transfer_job(env, run=run, **env.pop("transfer"))
    except INFRASTRUCTURE_ERRORS:
        raise
    except Ignore:
        if run is not None:
            with transaction.atomic():
                run.finish()
        raise
    except Exception:
        exc_info = sys.exc_info()
        try:
            return _run_error_handlers(env, exc_info)  # type: ignore[arg-type]
        finally:
            if run is not None:
                with transaction.atomic():
                    run.finish()
