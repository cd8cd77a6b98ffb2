"""Hand-off from a committed resume to the recipe runner.

``delay_environ`` calls :meth:`Dispatcher.dispatch` inside the resume's transaction. The local
dispatcher writes a :class:`~oioioi.workers.models.PendingRun` row there, so the hand-off commits or
rolls back with the resume itself: a process that dies right after the commit leaves the row
behind, and whoever calls :meth:`run_pending` next (a consumer sweeps when it starts, after each
ack and when idle; so does ``manage.py run_pending_jobs``) claims it once its lease has expired and
runs it; a row nobody has claimed yet is taken at once.

A run is claimed with a lease (``claimed_by`` / ``claimed_until``, ``EVALMGR_RUN_LEASE_SECONDS``).
Each recipe phase commits with a checkpoint of the environ that also checks and extends the lease,
so a phase whose runner lost the lease rolls back instead of committing twice, and a crash between
phases resumes after the last committed one. A run stopped by a database error keeps its claim and
is run again by the same process at its next :meth:`run_pending`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.module_loading import import_string

from oioioi.evalmgr.tasks import INFRASTRUCTURE_ERRORS, Ignore, LeaseLost, evalmgr_job

log = logging.getLogger(__name__)

#: How long a claim holds before another runner may take the run over, unless
#: ``settings.EVALMGR_RUN_LEASE_SECONDS`` says otherwise; must exceed one phase.
LEASE = timedelta(seconds=300)
#: Claims after which a run is left alone for an operator (it keeps killing its runner).
MAX_ATTEMPTS = 5


class Dispatcher:
    """Interface: hand a resumed environ to the runner."""

    def dispatch(self, environ: dict[str, Any], **extra: Any) -> str:
        raise NotImplementedError

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        """Run what this process dispatched, then (with ``sweep``) any abandoned runs; returns
        how many ran."""
        return 0


def lease() -> timedelta:
    seconds = getattr(settings, "EVALMGR_RUN_LEASE_SECONDS", None)
    return LEASE if seconds is None else timedelta(seconds=seconds)


class _ClaimedRun:
    def __init__(self, pk: int, token: str) -> None:
        self.pk = pk
        self.token = token

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
        deleted, _ = self._mine().delete()
        if not deleted:
            raise LeaseLost(f"run {self.pk} was taken over by another runner")


@dataclass(frozen=True)
class _Preclaimed:
    """A run claimed together with others of its batch, and read with them."""

    token: str
    claimed_at: float
    environ: str
    job_id: str

    def stale(self) -> bool:
        return time.monotonic() - self.claimed_at > lease().total_seconds() / 2


class LocalDispatcher(Dispatcher):
    """Durable hand-off; runs the recipes in this process, after the caller's commit and ack."""

    def __init__(self) -> None:
        self._ready: list[int] = []
        #: Runs this process still holds the claim of, stopped by the database going away: run
        #: again by this process at once, rather than by anyone after the lease has expired.
        #: Maps to the claim's token and how often the run stopped that way in a row.
        self._held: dict[int, tuple[str, int]] = {}
        self._token_prefix = f"{socket.gethostname()}:{os.getpid()}"

    def dispatch(self, environ: dict[str, Any], **extra: Any) -> str:
        from oioioi.workers.models import PendingRun

        run = PendingRun.objects.create(job_id=environ["job_id"], environ=json.dumps(environ))
        transaction.on_commit(lambda: self._ready.append(run.pk))
        return f"run-{run.pk}"

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        from oioioi.workers.models import PendingRun

        ran = 0
        # Each is taken off its list only as it is tried: when the database goes away midway,
        # the rest stay for the next call.
        tried: list[int] = []
        for pk in list(self._held):
            tried.append(pk)
            ran += self._run(pk, *self._held.pop(pk))
        ready = list(self._ready)
        if ready:
            claimed = self._claim_ready(ready)
            # Claimed runs count as held until each is tried: if this call ends midway, the
            # next one renews their claim and runs them (the unclaimed are someone else's).
            for pk in ready:
                self._ready.remove(pk)
                tried.append(pk)
                if pk in claimed:
                    self._held[pk] = (claimed[pk].token, 0)
            for pk, preclaimed in claimed.items():
                self._held.pop(pk, None)
                ran += self._run(pk, preclaimed=preclaimed)
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

    def _claim_ready(self, pks: list[int]) -> dict[int, _Preclaimed]:
        """Claim the runs this process dispatched, all with one statement, and read them.

        The claim and the read commit together, so a failure leaves none of them claimed (they
        stay ready). One claim for a whole batch saves two statements and a commit per run.
        """
        from oioioi.workers.models import PendingRun

        token = f"{self._token_prefix}:{uuid.uuid4().hex[:12]}"
        now = timezone.now()
        claimed_at = time.monotonic()
        with transaction.atomic():
            PendingRun.objects.filter(pk__in=pks, attempts__lt=MAX_ATTEMPTS).filter(
                Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
            ).update(claimed_by=token, claimed_until=now + lease(), attempts=F("attempts") + 1)
            rows = PendingRun.objects.filter(pk__in=pks, claimed_by=token).values_list(
                "pk", "environ", "job_id"
            )
            return {
                pk: _Preclaimed(token, claimed_at, environ, job_id) for pk, environ, job_id in rows
            }

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
                token = f"{self._token_prefix}:{uuid.uuid4().hex[:12]}"
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

    def _run(
        self,
        pk: int,
        held: str | None = None,
        stops: int = 0,
        preclaimed: _Preclaimed | None = None,
    ) -> int:
        from oioioi.workers.models import PendingRun

        if preclaimed is not None and not preclaimed.stale():
            run: _ClaimedRun | None = _ClaimedRun(pk, preclaimed.token)
            row: tuple[str, str] | None = (preclaimed.environ, preclaimed.job_id)
        else:
            # A claim made for a whole batch is renewed first if the runs before this one took
            # long enough to bring its lease near its end.
            token = held if preclaimed is None else preclaimed.token
            try:
                run = self._claim(pk, token)
                if run is None:
                    return 0
                token = run.token
                row = PendingRun.objects.filter(pk=pk).values_list("environ", "job_id").first()
            except INFRASTRUCTURE_ERRORS:
                self._hold(pk, token, stops)
                raise
        if run is None or row is None:
            return 0
        environ = json.loads(row[0])
        try:
            evalmgr_job(environ, run=run)
        except Ignore:
            log.info("Job %r was cancelled; its run ended.", row[1])
        except LeaseLost:
            log.warning("Run %r of job %r was taken over by another runner.", pk, row[1])
        except INFRASTRUCTURE_ERRORS:
            self._hold(pk, run.token, stops + 1)
            log.warning("Run %r of job %r stopped; it will be retried.", pk, row[1], exc_info=True)
        except Exception:
            # evalmgr_job ran the error handlers and finished the run; the job is over.
            log.exception("Job %r failed in its recipe.", row[1])
        return 1


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
