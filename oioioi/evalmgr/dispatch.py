"""Hand-off from a committed resume to the recipe runner.

``delay_environ`` calls :meth:`Dispatcher.dispatch` inside the resume's transaction (the batched
``delay_environs`` calls :meth:`Dispatcher.dispatch_many`). The local dispatcher writes a
:class:`~oioioi.workers.models.PendingRun` row there, so the hand-off commits or rolls back with
the resume itself: a process that dies right after the commit leaves the row behind, and whoever
calls :meth:`run_pending` next (a consumer sweeps when it starts and every few seconds; so does
``manage.py run_pending_jobs``) takes it over once its claim has expired and runs it.

A run is claimed with a lease (``claimed_by`` / ``claimed_until``). A consumer writes the runs of
its own batch already claimed by itself for a short hand-off lease (:data:`HANDOFF`), runs them
right after the ack, a phase of every job at a time (:func:`~oioioi.evalmgr.batch.run_recipes`),
and each round locks its runs' rows for as long as its phases run; a run taken over from a dead
runner (or written by a process that runs no recipes) is claimed for the full lease
(``EVALMGR_RUN_LEASE_SECONDS``) and run on its own. Each phase commits with a checkpoint of the
environ that also extends the lease, so a crash between phases resumes after the last committed
one, and a runner that lost its claim commits nothing more. A run stopped by a database error
keeps its claim and is run again by the same process at its next :meth:`run_pending`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.module_loading import import_string

from oioioi.evalmgr.batch import run_recipes
from oioioi.evalmgr.sql import delete_in, insert_returning, select_in, update_each
from oioioi.evalmgr.tasks import INFRASTRUCTURE_ERRORS, Ignore, LeaseLost, evalmgr_job

log = logging.getLogger(__name__)

#: How long a claim holds before another runner may take the run over, unless
#: ``settings.EVALMGR_RUN_LEASE_SECONDS`` says otherwise; must exceed one phase.
LEASE = timedelta(seconds=300)
#: How long the claim of a run written by the process that will run it holds before another
#: runner may take it over: how long a run waits when that process dies before running it.
HANDOFF = timedelta(seconds=10)
#: Claims after which a run is left alone for an operator (it keeps killing its runner).
MAX_ATTEMPTS = 5


class Dispatcher:
    """Interface: hand a resumed environ to the runner."""

    def dispatch(self, environ: dict[str, Any], **extra: Any) -> str:
        raise NotImplementedError

    def dispatch_many(
        self, environs: Sequence[dict[str, Any]], *, run_here: bool = False
    ) -> list[str]:
        """:meth:`dispatch` each, in order; a dispatcher may do it with fewer statements.
        ``run_here`` says that the caller will call :meth:`run_pending` right after its commit."""
        return [self.dispatch(environ) for environ in environs]

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        """Run what this process dispatched, then (with ``sweep``) any abandoned runs; returns
        how many ran."""
        return 0


def lease() -> timedelta:
    seconds = getattr(settings, "EVALMGR_RUN_LEASE_SECONDS", None)
    return LEASE if seconds is None else timedelta(seconds=seconds)


def handoff_lease() -> timedelta:
    return min(lease(), HANDOFF)


class _ClaimedRun:
    """One claimed run, for :func:`~oioioi.evalmgr.tasks.evalmgr_job`."""

    def __init__(self, pk: int, token: str) -> None:
        self.pk = pk
        self.token = token
        self._finished = False

    def _mine(self) -> Any:
        from oioioi.workers.models import PendingRun

        return PendingRun.objects.filter(pk=self.pk, claimed_by=self.token)

    def checkpoint(self, environ: dict[str, Any]) -> None:
        updated = self._mine().update(
            environ=json.dumps(environ), claimed_until=timezone.now() + lease()
        )
        if not updated:
            raise LeaseLost(f"run {self.pk} was taken over by another runner")

    def finish(self) -> None:
        if self._finished:
            # A transfer ends its run with the job's save; a transfer call that then fails
            # brings evalmgr_job here a second time.
            return
        deleted, _ = self._mine().delete()
        if not deleted:
            raise LeaseLost(f"run {self.pk} was taken over by another runner")
        self._finished = True


class _ClaimedBatch:
    """The runs of one batch claim (one token), for :func:`~oioioi.evalmgr.batch.run_recipes`."""

    def __init__(self, token: str) -> None:
        self.token = token

    def keep(self, keys: Collection[int]) -> set[int]:
        from oioioi.workers.models import PendingRun

        # A lock, not a renewal: while the caller's transaction holds the rows, no other runner
        # can take them over, and a checkpoint renews the lease before the lock is let go.
        rows = select_in(
            PendingRun, ["id"], "id", list(keys), where={"claimed_by": self.token}, lock=True
        )
        return {pk for (pk,) in rows}

    def checkpoint(self, environs: Mapping[int, str]) -> None:
        from oioioi.workers.models import PendingRun

        update_each(
            PendingRun,
            "id",
            "environ",
            environs,
            also={"claimed_until": timezone.now() + lease()},
            where={"claimed_by": self.token},
        )

    def finish(self, keys: Collection[int]) -> None:
        from oioioi.workers.models import PendingRun

        delete_in(PendingRun, "id", list(keys), where={"claimed_by": self.token})


class LocalDispatcher(Dispatcher):
    """Durable hand-off; runs the recipes in this process, after the caller's commit and ack.

    The runs a process dispatched itself are run as a batch (:func:`~oioioi.evalmgr.batch.
    run_recipes`); runs taken over from a runner that died are run one at a time, so that a job
    that kills its runner is charged its attempts alone.
    """

    def __init__(self) -> None:
        #: Runs this process dispatched and claimed, waiting for their batch to run: the claim's
        #: token, and each run's environ by primary key, as JSON and as the dict it was made from
        #: (so that the runner does not parse again what the writer has just serialised).
        self._ready: list[tuple[str, dict[int, tuple[str, dict[str, Any]]]]] = []
        #: Runs this process still holds the claim of, stopped by the database going away: run
        #: again by this process at once, rather than by anyone after the lease has expired.
        #: Maps to the claim's token and how often the run stopped that way in a row.
        self._held: dict[int, tuple[str, int]] = {}
        self._token_prefix = f"{socket.gethostname()}:{os.getpid()}"

    def _token(self) -> str:
        return f"{self._token_prefix}:{uuid.uuid4().hex[:12]}"

    def dispatch(self, environ: dict[str, Any], **extra: Any) -> str:
        from oioioi.workers.models import PendingRun

        # Left unclaimed: whoever sweeps first runs it (this process, if it runs recipes).
        run = PendingRun.objects.create(job_id=environ["job_id"], environ=json.dumps(environ))
        return f"run-{run.pk}"

    def dispatch_many(
        self, environs: Sequence[dict[str, Any]], *, run_here: bool = False
    ) -> list[str]:
        """Write a run for each environ; with ``run_here`` (the caller calls
        :meth:`run_pending` after its commit) they are claimed for this process, so that no
        statement is spent claiming them, for a short hand-off lease in case it dies first, and
        the environs themselves are what the runner gets: the caller must not use them after."""
        from oioioi.workers.models import PendingRun

        job_ids = [env["job_id"] for env in environs]
        texts = [json.dumps(env) for env in environs]
        now = timezone.now()
        claim: dict[str, Any] = {"attempts": 0}
        if run_here:
            token = self._token()
            claim = {"claimed_by": token, "claimed_until": now + handoff_lease(), "attempts": 1}
        if connection.features.can_return_rows_from_bulk_insert and len(set(job_ids)) == len(
            job_ids
        ):
            names = ["job_id", "environ", "created_at", *claim]
            rows = [(j, text, now, *claim.values()) for j, text in zip(job_ids, texts, strict=True)]
            pk_of = dict(insert_returning(PendingRun, names, rows, ["job_id", "id"]))
            pks = [pk_of[job_id] for job_id in job_ids]
        else:
            pks = [
                PendingRun.objects.create(job_id=j, environ=text, created_at=now, **claim).pk
                for j, text in zip(job_ids, texts, strict=True)
            ]
        if run_here:
            batch = (token, dict(zip(pks, zip(texts, environs, strict=True), strict=True)))
            transaction.on_commit(lambda: self._ready.append(batch))
        return [f"run-{pk}" for pk in pks]

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        from oioioi.workers.models import PendingRun

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
            abandoned = (
                PendingRun.objects.filter(attempts__lt=MAX_ATTEMPTS)
                .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=timezone.now()))
                .exclude(pk__in=[*tried, *self._held])
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            for pk in abandoned[: (limit - ran) if limit is not None else 100]:
                ran += self._run(pk)
        return ran

    def _run_batch(self, token: str, environs: dict[int, tuple[str, dict[str, Any]]]) -> int:
        # Held until each has run: if the database goes away midway, the next call renews
        # their claims and runs each on its own, from its last checkpoint.
        for pk in environs:
            self._held[pk] = (token, 0)
        done_alone: set[int] = set()

        def alone(pk: int, environ: dict[str, Any]) -> None:
            done_alone.add(pk)
            self._held.pop(pk, None)
            self._execute(pk, _ClaimedRun(pk, token), environ, 0)

        texts = {pk: text for pk, (text, _) in environs.items()}
        parsed = {pk: env for pk, (_, env) in environs.items()}
        ran = run_recipes(texts, _ClaimedBatch(token), alone, parsed=parsed)
        for pk in environs:
            if pk not in done_alone:
                self._held.pop(pk, None)
        return ran

    def _claim(self, pk: int, held: str | None = None) -> _ClaimedRun | None:
        from oioioi.workers.models import PendingRun

        now = timezone.now()
        with transaction.atomic():
            if held is not None:
                # Renewing our own claim is not a new attempt: nothing killed its runner.
                token = held
                claimed = PendingRun.objects.filter(pk=pk, claimed_by=token).update(
                    claimed_until=now + lease()
                )
            else:
                token = self._token()
                claimed = (
                    PendingRun.objects.filter(pk=pk, attempts__lt=MAX_ATTEMPTS)
                    .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
                    .update(
                        claimed_by=token, claimed_until=now + lease(), attempts=F("attempts") + 1
                    )
                )
        return _ClaimedRun(pk, token) if claimed else None

    def _hold(self, pk: int, token: str | None, stops: int) -> None:
        # A recipe that keeps stopping with database errors is left to its lease, which counts
        # its attempts.
        if token is not None and stops < MAX_ATTEMPTS:
            self._held[pk] = (token, stops)

    def _run(self, pk: int, held: str | None = None, stops: int = 0) -> int:
        """Claim one run (or renew a claim held) and run it; returns 1 if it ran."""
        from oioioi.workers.models import PendingRun

        try:
            run = self._claim(pk, held)
            if run is None:
                return 0
            held = run.token
            text = PendingRun.objects.filter(pk=pk).values_list("environ", flat=True).first()
        except INFRASTRUCTURE_ERRORS:
            self._hold(pk, held, stops)
            raise
        if text is None:
            return 0
        self._execute(pk, run, json.loads(text), stops)
        return 1

    def _execute(self, pk: int, run: _ClaimedRun, environ: dict[str, Any], stops: int) -> None:
        job_id = environ.get("job_id")
        try:
            evalmgr_job(environ, run=run)
        except Ignore:
            log.info("Job %r was cancelled; its run ended.", job_id)
        except LeaseLost:
            log.warning("Run %r of job %r was taken over by another runner.", pk, job_id)
        except INFRASTRUCTURE_ERRORS:
            self._hold(pk, run.token, stops + 1)
            log.warning("Run %r of job %r stopped; it will be retried.", pk, job_id, exc_info=True)
        except Exception:
            # evalmgr_job ran the error handlers and finished the run; the job is over.
            log.exception("Job %r failed in its recipe.", job_id)


_dispatcher: Dispatcher | None = None


def get_dispatcher() -> Dispatcher:
    """The process-wide dispatcher named by ``settings.EVALMGR_DISPATCHER``."""
    global _dispatcher
    path = settings.EVALMGR_DISPATCHER
    if (
        _dispatcher is None
        or f"{type(_dispatcher).__module__}.{type(_dispatcher).__qualname__}" != path
    ):
        _dispatcher = import_string(path)()
    return _dispatcher
