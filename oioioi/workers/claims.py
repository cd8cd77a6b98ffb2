"""Claims on pending runs: who runs a run, until when, and how often it was tried.

A run is claimed with a lease (``claimed_by`` / ``claimed_until``): nobody else may take it until
the lease has expired, and a runner that lost its claim commits nothing more. A claim's token
names its owner (host, process, a random part); a relay's token starts with :data:`RELAY_PREFIX`,
and the Celery task it relayed may take its claim over.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from oioioi.workers.conf import setting
from oioioi.workers.models import PendingRun
from oioioi.workers.runner import LeaseLost
from oioioi.workers.sql import delete_in, select_in, update_each

#: How long the claim of a run written by the process that will run (or relay) it holds before
#: another runner may take it over: how long a run waits when that process dies first.
HANDOFF = timedelta(seconds=10)
#: Claims after which a run is left alone for an operator (it keeps killing its runner).
MAX_ATTEMPTS = 5
#: Prefix of the claim a relay holds on a run it handed to Celery; the task may take it over.
RELAY_PREFIX = "relay:"


def lease() -> timedelta:
    """How long a runner's claim holds (``EVALMGR_RUN_LEASE_SECONDS``); must exceed one phase."""
    return timedelta(seconds=setting("EVALMGR_RUN_LEASE_SECONDS"))


def handoff_lease() -> timedelta:
    return min(lease(), HANDOFF)


def relay_lease() -> timedelta:
    """How long a run handed to Celery may wait in its queue before it is handed over again
    (``EVALMGR_RELAY_LEASE_SECONDS``): a task Celery lost is replaced after this long."""
    return timedelta(seconds=setting("EVALMGR_RELAY_LEASE_SECONDS"))


def claim_token(kind: str = "") -> str:
    """A claim's owner: host, process and a random part (a claim per batch or run)."""
    return f"{kind}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def takeable(now: Any) -> Q:
    """Runs that nobody holds: never claimed, or their claim has expired."""
    return Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)


class ClaimedBatch:
    """The runs of one batch claim (one token), for :func:`~oioioi.workers.runner.run_recipes`;
    every method runs in the caller's transaction."""

    def __init__(self, token: str) -> None:
        self.token = token

    def keep(self, keys: Collection[int]) -> set[int]:
        # A lock, not a renewal: while the caller's transaction holds the rows, no other runner
        # can take them over, and a checkpoint renews the lease before the lock is let go.
        rows = select_in(
            PendingRun, ["id"], "id", list(keys), where={"claimed_by": self.token}, lock=True
        )
        self._found(len(rows), keys)
        return {pk for (pk,) in rows}

    def checkpoint(self, environs: Mapping[int, str]) -> None:
        updated = update_each(
            PendingRun,
            "id",
            "environ",
            environs,
            also={"claimed_until": timezone.now() + lease()},
            where={"claimed_by": self.token},
        )
        self._found(updated, environs)

    def finish(self, keys: Collection[int]) -> None:
        self._found(delete_in(PendingRun, "id", list(keys), where={"claimed_by": self.token}), keys)

    def _found(self, count: int, keys: Collection[int]) -> None:
        """``count`` of the runs ``keys`` were found still claimed: a batch goes on with them
        (the others were taken over, and :meth:`keep` leaves them out)."""


class ClaimedRun(ClaimedBatch):
    """One claimed run, for :func:`~oioioi.workers.runner.run_one`: the claim of a batch of one,
    which raises :class:`~oioioi.workers.runner.LeaseLost` once its run was taken over."""

    def __init__(self, pk: int, token: str) -> None:
        super().__init__(token)
        self.pk = pk

    def _found(self, count: int, keys: Collection[int]) -> None:
        if count < len(keys):
            raise LeaseLost(f"run {self.pk} was taken over by another runner")


def claim(pk: int, token: str, *, held: bool = False) -> bool:
    """Claim a run for ``token`` for the full lease (one more attempt), if nobody holds it; with
    ``held``, renew the claim ``token`` already has (not a new attempt: nothing killed its
    runner). A run that a relay handed to Celery may be claimed by the task it relayed."""
    now = timezone.now()
    with transaction.atomic():
        runs = PendingRun.objects.filter(pk=pk)
        if held:
            return bool(runs.filter(claimed_by=token).update(claimed_until=now + lease()))
        return bool(
            runs.filter(attempts__lt=MAX_ATTEMPTS)
            .filter(takeable(now) | Q(claimed_by__startswith=RELAY_PREFIX))
            .update(claimed_by=token, claimed_until=now + lease(), attempts=F("attempts") + 1)
        )


def claim_environ(pk: int, token: str, *, held: bool = False) -> str | None:
    """:func:`claim` a run and read its environ (JSON); None if it was not claimed, or is gone."""
    if not claim(pk, token, held=held):
        return None
    text: str | None = PendingRun.objects.filter(pk=pk).values_list("environ", flat=True).first()
    return text


def abandoned(exclude: Collection[int], count: int) -> list[int]:
    """Runs nobody holds (and that have not used up their attempts), oldest first."""
    return list(
        PendingRun.objects.filter(attempts__lt=MAX_ATTEMPTS)
        .filter(takeable(timezone.now()))
        .exclude(pk__in=list(exclude))
        .order_by("pk")
        .values_list("pk", flat=True)[:count]
    )
