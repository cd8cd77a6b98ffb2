"""Hand-off from a committed resume to the recipe runner: a transactional outbox.

:func:`~oioioi.workers.resume.delay_environs` calls :meth:`Dispatcher.dispatch_many` inside the
resume's transaction. Both dispatchers here write a :class:`~oioioi.workers.models.PendingRun` row
for each resumed environ there, so the hand-off commits or rolls back with the resume itself: a
process that dies right after the commit leaves the row behind, and whoever calls
:meth:`~Dispatcher.run_pending` next (a consumer sweeps when it starts and every few seconds; so
does ``manage.py run_pending_jobs``) takes it over once its claim has expired.

- :class:`LocalDispatcher` runs the recipes in this process, after the caller's commit and ack:
  the runs of a batch together (:func:`~oioioi.workers.runner.run_recipes`), a phase of every job
  at a time, each phase committed with a checkpoint of its environ.
- :class:`CeleryDispatcher` relays each row after the commit to the Celery queue upstream routes
  ``evalmgr_job`` to (``evalmgr``), with publisher confirms; the task
  (:func:`~oioioi.workers.tasks.run_pending_job`) claims the row and runs upstream's
  ``evalmgr_job`` on it in the Celery worker, then deletes it. A row relayed twice (a relay that
  died before it recorded its publish, a task Celery lost) runs once: the second task finds it
  claimed or gone.

A run is claimed with a lease (``claimed_by`` / ``claimed_until``). A consumer writes the runs of
its own batch already claimed by itself for a short hand-off lease (:data:`HANDOFF`); a run taken
over from a dead runner is claimed for the full lease (``EVALMGR_RUN_LEASE_SECONDS``). Each local
phase commits with a checkpoint of the environ that also extends the lease, so a crash between
phases resumes after the last committed one, and a runner that lost its claim commits nothing more.
A run stopped by a database error keeps its claim and is run again by the same process at its
next :meth:`~Dispatcher.run_pending`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from consumer.environ import environ_json, loads
from oioioi.workers import tasks
from oioioi.workers.claims import (
    MAX_ATTEMPTS,
    RELAY_PREFIX,
    ClaimedBatch,
    ClaimedRun,
    abandoned,
    claim_environ,
    claim_token,
    handoff_lease,
    relay_lease,
    takeable,
)
from oioioi.workers.conf import setting
from oioioi.workers.models import PendingRun
from oioioi.workers.runner import (
    INFRASTRUCTURE_ERRORS,
    LeaseLost,
    outcome_logged,
    run_one,
    run_recipes,
)
from oioioi.workers.sql import insert_rows, select_in, update_in

log = logging.getLogger(__name__)

Environ = MutableMapping[str, Any]


class Dispatcher:
    """Interface: hand resumed environs to the runner, inside the resume's transaction."""

    #: Said in the consumer's log line at start.
    description = "a dispatcher"

    def dispatch_many(self, environs: Sequence[Environ], *, run_here: bool = False) -> list[str]:
        """Hand each environ on; returns a handle for each (the job's ``celery_task_id``).
        ``run_here`` says that the caller will call :meth:`run_pending` right after its commit."""
        raise NotImplementedError

    def dispatch(self, environ: Environ, **extra: Any) -> str:
        return self.dispatch_many([environ])[0]

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        """Run (or relay) what this process dispatched, then (with ``sweep``) any abandoned
        runs; returns how many it took."""
        return 0


class DurableDispatcher(Dispatcher):
    """Writes each hand-off as a ``PendingRun`` row; subclasses say who runs it."""

    #: Claims are made with tokens starting with this.
    token_kind = ""
    #: ``attempts`` of a run claimed as it is written: a local run is being run, a relayed one
    #: is not yet (the task counts its own attempt).
    _first_attempts = 1

    def __init__(self) -> None:
        #: Runs this process dispatched and claimed, waiting for their batch to run (or be
        #: relayed): the claim's token, and by primary key what :meth:`_for_runner` keeps.
        self._ready: list[tuple[str, dict[int, tuple[bytes, dict[str, Any] | None]]]] = []

    def dispatch_many(self, environs: Sequence[Environ], *, run_here: bool = False) -> list[str]:
        """Write a run for each environ; with ``run_here`` they are claimed for this process, so
        that no statement is spent claiming them, for a short hand-off lease in case it dies
        first, and the environs themselves are what the runner gets: the caller must not use
        them after."""
        job_ids = [env["job_id"] for env in environs]
        # An environ that came as JSON is written as it came (joined field by field).
        texts = [environ_json(env) for env in environs]
        now = timezone.now()
        claim: dict[str, Any] = {"attempts": 0}
        token = claim_token(self.token_kind)
        if run_here:
            claim = {
                "claimed_by": token,
                "claimed_until": now + handoff_lease(),
                "attempts": self._first_attempts,
            }
        names = ["job_id", "environ", "created_at", *claim]
        if len(set(job_ids)) == len(job_ids):
            rows = [(j, text, now, *claim.values()) for j, text in zip(job_ids, texts, strict=True)]
            pks = insert_rows(PendingRun, names, rows, key="job_id")
        else:
            pks = [
                insert_rows(PendingRun, names, [(j, text, now, *claim.values())], key="job_id")[0]
                for j, text in zip(job_ids, texts, strict=True)
            ]
        if run_here:
            batch = (token, self._for_runner(pks, texts, environs))
            transaction.on_commit(lambda: self._ready.append(batch))
        return [f"run-{pk}" for pk in pks]

    def _for_runner(
        self, pks: Sequence[int], texts: Sequence[bytes], environs: Sequence[Environ]
    ) -> dict[int, tuple[bytes, dict[str, Any] | None]]:
        """What the runner gets of the runs just written: each run's JSON, and the dict it was
        made from if there was one (so that nothing is parsed that was never serialised)."""
        return {
            pk: (text, env if isinstance(env, dict) else None)
            for pk, text, env in zip(pks, texts, environs, strict=True)
        }


# --- running in this process ---------------------------------------------------------------------


class LocalDispatcher(DurableDispatcher):
    """Durable hand-off; runs the recipes in this process, after the caller's commit and ack.

    The runs a process dispatched itself are run as a batch (:func:`~oioioi.workers.runner.
    run_recipes`); runs taken over from a runner that died are run one at a time, so that a job
    that kills its runner is charged its attempts alone.
    """

    description = "run by this process, in batches, each phase checkpointed"

    def __init__(self) -> None:
        super().__init__()
        #: Runs this process still holds the claim of, stopped by the database going away: run
        #: again by this process at once, rather than by anyone after the lease has expired.
        #: Maps to the claim's token and how often the run stopped that way in a row.
        self._held: dict[int, tuple[str, int]] = {}

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        ran = 0
        # Each is taken off its list only as it is tried: when the database goes away midway,
        # the rest stay for the next call.
        tried: list[int] = []
        for pk in list(self._held):
            tried.append(pk)
            ran += self._run(pk, *self._held.pop(pk))
        while self._ready:
            token, environs = self._ready.pop(0)
            tried.extend(environs)
            ran += self._run_batch(token, environs)
        if sweep and (limit is None or ran < limit):
            for pk in abandoned([*tried, *self._held], (limit - ran) if limit else 100):
                ran += self._run(pk)
        return ran

    def run_written(self, token: str, pks: Sequence[int]) -> int:
        """Run a batch of runs that another process wrote and claimed with ``token`` (a
        :class:`~oioioi.workers.runner_process.ProcessDispatcher`), reading their environs back
        from their rows; returns how many it took. If the database goes away midway, the runs
        stay held and the next :meth:`run_pending` runs each on its own."""
        for pk in pks:
            self._held[pk] = (token, 0)
        rows = select_in(
            PendingRun, ["id", "environ"], "id", list(pks), where={"claimed_by": token}
        )
        texts: dict[int, tuple[bytes | str, dict[str, Any] | None]] = {
            pk: (text, None) for pk, text in rows
        }
        for pk in pks:
            if pk not in texts:  # taken over, or run and gone: not this batch's any more
                self._held.pop(pk, None)
        return self._run_batch(token, texts)

    def run_abandoned(self, pk: int) -> int:
        """Claim a run that nobody holds (one more attempt) and run it on its own; returns 1 if
        it ran, 0 if someone else had claimed it meanwhile."""
        return self._run(pk)

    @property
    def holding(self) -> bool:
        """Whether runs stopped by the database wait to be run again by this process."""
        return bool(self._held)

    def _run_batch(
        self, token: str, environs: Mapping[int, tuple[bytes | str, dict[str, Any] | None]]
    ) -> int:
        # Held until each has run: if the database goes away midway, the next call renews
        # their claims and runs each on its own, from its last checkpoint.
        for pk in environs:
            self._held[pk] = (token, 0)
        done_alone: set[int] = set()

        def alone(pk: int, environ: dict[str, Any]) -> None:
            done_alone.add(pk)
            self._held.pop(pk, None)
            self._execute(pk, ClaimedRun(pk, token), environ, 0)

        texts = {pk: text for pk, (text, _) in environs.items()}
        parsed = {pk: env for pk, (_, env) in environs.items() if env is not None}
        ran = run_recipes(texts, ClaimedBatch(token), alone, parsed=parsed)
        for pk in environs:
            if pk not in done_alone:
                self._held.pop(pk, None)
        return ran

    def _hold(self, pk: int, token: str | None, stops: int) -> None:
        # A recipe that keeps stopping with database errors is left to its lease, which counts
        # its attempts.
        if token is not None and stops < MAX_ATTEMPTS:
            self._held[pk] = (token, stops)

    def _run(self, pk: int, held: str | None = None, stops: int = 0) -> int:
        """Claim one run (or renew a claim held) and run it; returns 1 if it ran."""
        token = held or claim_token()
        try:
            text = claim_environ(pk, token, held=held is not None)
        except INFRASTRUCTURE_ERRORS:
            self._hold(pk, held, stops)
            raise
        if text is None:
            return 0
        self._execute(pk, ClaimedRun(pk, token), loads(text), stops)
        return 1

    def _execute(self, pk: int, run: ClaimedRun, environ: dict[str, Any], stops: int) -> None:
        job_id = environ.get("job_id")
        try:
            # A cancelled job, or one whose error handlers ran, is over: its run is finished.
            with outcome_logged(job_id):
                run_one(environ, run)
        except LeaseLost:
            log.warning("Run %r of job %r was taken over by another runner.", pk, job_id)
        except INFRASTRUCTURE_ERRORS:
            self._hold(pk, run.token, stops + 1)
            log.warning("Run %r of job %r stopped; it will be retried.", pk, job_id, exc_info=True)


# --- relaying to Celery --------------------------------------------------------------------------


class CeleryDispatcher(DurableDispatcher):
    """Durable hand-off to upstream's Celery evaluation workers.

    After the caller's commit, :meth:`run_pending` publishes one task per run to the queue that
    ``evalmgr_job`` is routed to, and waits for the broker's confirms; only then does it record
    the runs as relayed (for ``EVALMGR_RELAY_LEASE_SECONDS``). A run whose publish failed, or
    whose relay died first, is relayed again by the next sweep once its claim has expired.
    """

    description = "relayed to Celery's evalmgr workers through the outbox, with publisher confirms"
    token_kind = RELAY_PREFIX
    _first_attempts = 0

    def _for_runner(
        self, pks: Sequence[int], texts: Sequence[bytes], environs: Sequence[Environ]
    ) -> dict[int, tuple[bytes, dict[str, Any] | None]]:
        # Only the runs' keys: the task reads each run's environ from its row.
        return {pk: (b"", None) for pk in pks}

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        relayed = 0
        while self._ready:
            token, environs = self._ready[0]
            relayed += self._relay(token, list(environs))
            self._ready.pop(0)
        if sweep and (limit is None or relayed < limit):
            pks = abandoned([], (limit - relayed) if limit else 100)
            if pks:
                token = claim_token(RELAY_PREFIX)
                now = timezone.now()
                with transaction.atomic():
                    PendingRun.objects.filter(pk__in=pks).filter(takeable(now)).update(
                        claimed_by=token, claimed_until=now + handoff_lease()
                    )
                    claimed = list(
                        PendingRun.objects.filter(pk__in=pks, claimed_by=token).values_list(
                            "pk", flat=True
                        )
                    )
                relayed += self._relay(token, claimed)
        return relayed

    def _relay(self, token: str, pks: list[int]) -> int:
        """Publish a task for each run, confirmed, then extend the relay's claim on them."""
        if not pks:
            return 0
        try:
            tasks.publish(pks)
        except Exception as e:
            # Left claimed for the hand-off lease: the next sweep after it relays them again.
            log.warning(
                "Could not hand %d run(s) to Celery (%s); they will be handed over again.",
                len(pks),
                e,
            )
            return 0
        update_in(
            PendingRun,
            "id",
            pks,
            {"claimed_until": timezone.now() + relay_lease()},
            where={"claimed_by": token},
        )
        return len(pks)


_dispatcher: Dispatcher | None = None


def get_dispatcher() -> Dispatcher:
    """The process-wide dispatcher named by ``EVALMGR_DISPATCHER``."""
    global _dispatcher
    path = setting("EVALMGR_DISPATCHER")
    if (
        _dispatcher is None
        or f"{type(_dispatcher).__module__}.{type(_dispatcher).__qualname__}" != path
    ):
        _dispatcher = import_string(path)()
    return _dispatcher
