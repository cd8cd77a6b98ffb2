"""The consumer's :class:`~consumer.loop.Store`: its database side, built by :func:`build`.

The write (:func:`write`: results applied through ``delay_environs`` with their inbox rows, in one
durable transaction), the classic queues' attempt counts, the database probe, and what runs after
the ack and every few seconds (the resumed recipes, the sweep for abandoned runs). Which database
errors count as transient is :mod:`oioioi.workers.errors`'s to say.

Everything here runs on the consumer's database thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from consumer import environ
from consumer.config import Settings
from consumer.decode import Result
from consumer.errors import NoSavedEnviron, RejectedEnviron
from consumer.loop import Store
from oioioi.workers.dispatch import get_dispatcher
from oioioi.workers.errors import TRANSIENT_ERRORS, ReadOnlyDatabase, read_only_is_transient
from oioioi.workers.models import DeliveryAttempt, ReceivedResult
from oioioi.workers.resume import delay_environs
from oioioi.workers.sql import insert_returning

log = logging.getLogger(__name__)

#: Fields the sioworkers restore function refuses in a resuming environ.
_STRIPPED_FIELDS = ("recipe", "error_handlers")


def check_environ(env: Mapping[str, Any]) -> None:
    """Refuse, as permanent, an environ that ``delay_environ`` could never apply, or would
    apply as no result should be: one that resumes no job."""
    job_id = env.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        raise RejectedEnviron("environ has no 'job_id'")
    saved_id = env.get("saved_environ_id")
    if saved_id is None:
        # delay_environ would queue it as a new job, whose recipe then fails: a worker's result
        # always answers a transfer, and names the environ the transfer saved.
        raise NoSavedEnviron("environ has no 'saved_environ_id'")
    if isinstance(saved_id, bool) or not isinstance(saved_id, int):
        raise RejectedEnviron(f"'saved_environ_id' must be an integer, not {saved_id!r}")
    for field in _STRIPPED_FIELDS:
        if field in env:
            raise RejectedEnviron(f"a resuming environ must not contain {field!r}")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _inbox_values(result: Result, now: datetime) -> dict[str, Any]:
    env = result.env
    return {
        "key": result.key,
        "message_id": result.message_id or "",
        "group_id": str(env.get("group_id") or "")[:255],
        "job_id": env["job_id"][:255],
        "submission_id": _int_or_none(env.get("submission_id")),
        "saved_environ_id": _int_or_none(env.get("saved_environ_id")),
        "outcome": "resumed",
        "received_at": now,
    }


def _bulk_inbox() -> bool:
    """Whether the database has ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (PostgreSQL,
    SQLite 3.35+); others insert the inbox rows one by one."""
    features = connection.features
    return bool(
        features.can_return_rows_from_bulk_insert and features.supports_update_conflicts_with_target
    )


def _insert_inbox(results: Sequence[Result]) -> set[str]:
    """Insert the batch's inbox rows; returns the keys that were new (a key already in the inbox,
    or twice in the batch, is the message's second copy).

    Rows go in key order, so two consumers holding overlapping batches take the keys' locks in
    the same order and cannot deadlock on them. On PostgreSQL a key that another transaction has
    inserted and not yet committed makes the insert wait for it, then skip the key (or take it, if
    that transaction rolled back): a second consumer writing the same message does nothing.
    """
    now = timezone.now()
    rows = sorted(
        {r.key: _inbox_values(r, now) for r in reversed(results)}.values(), key=lambda v: v["key"]
    )
    if not _bulk_inbox():
        return _insert_inbox_row_by_row(rows)
    # One statement per chunk: ``ON CONFLICT DO NOTHING`` skips a key that is already there.
    names = list(rows[0])
    inserted = insert_returning(
        ReceivedResult,
        names,
        [[row[name] for name in names] for row in rows],
        ["key"],
        skip_conflicts_on="key",
    )
    return {key for (key,) in inserted}


def _insert_inbox_row_by_row(rows: list[dict[str, Any]]) -> set[str]:
    """The same, on databases without ``ON CONFLICT ... RETURNING``: one savepoint per row, so
    that a key already there fails its own insert and nothing else."""
    fresh: set[str] = set()
    for row in rows:
        try:
            with transaction.atomic():
                ReceivedResult.objects.create(**row)
        except IntegrityError:
            continue
        fresh.add(row["key"])
    return fresh


@read_only_is_transient
def write(results: Sequence[Result]) -> list[str]:
    """Apply results in one durable transaction; committed when this returns."""
    close_old_connections()
    # The consumer refuses these before the batch (Store.check); checked again here so that no
    # caller can write half a batch before a refused environ fails it.
    for result in results:
        check_environ(result.env)
    outcomes = ["duplicate"] * len(results)
    with transaction.atomic(durable=True):
        fresh = _insert_inbox(results)
        applied: list[Result] = []
        for i, result in enumerate(results):
            if result.key not in fresh:
                continue
            fresh.discard(result.key)  # a second copy within the batch is a duplicate
            applied.append(result)
            outcomes[i] = "committed"
        if applied:
            handles = delay_environs([environ.copy(r.env) for r in applied], run_here=True)
            ignored = [r.key for r, h in zip(applied, handles, strict=True) if h is None]
            if ignored:
                ReceivedResult.objects.filter(key__in=ignored).update(outcome="ignored")
    return outcomes


@read_only_is_transient
def count_attempt(key: str) -> int:
    """Count one more attempt at writing ``key``, committed on its own; 0 if already applied."""
    close_old_connections()
    with transaction.atomic(durable=True):
        if ReceivedResult.objects.filter(key=key).exists():
            return 0
        counted = DeliveryAttempt.objects.filter(key=key).update(
            attempts=F("attempts") + 1, last_attempt_at=timezone.now()
        )
        if not counted:
            DeliveryAttempt.objects.create(key=key, attempts=1)
        return DeliveryAttempt.objects.get(key=key).attempts


def forget_attempt(key: str) -> None:
    DeliveryAttempt.objects.filter(key=key).delete()


def probe() -> None:
    """Raise unless the database answers and takes writes."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # A replica promoted-to-be (or a primary demoted) answers SELECT 1 but refuses writes.
            cursor.execute("SHOW transaction_read_only")
            if cursor.fetchone()[0] == "on":
                raise ReadOnlyDatabase("the database is read-only")
        else:
            cursor.execute("SELECT 1")


def reset() -> None:
    connection.close()


def describe(settings: Settings) -> str:
    """One line for the log at start: which write path and which recipe runner this runs."""
    if _bulk_inbox():
        write_path = (
            f"in batches of up to {settings.batch_size} results, a few set-based statements "
            "per batch"
        )
    else:
        write_path = (
            f"in batches of up to {settings.batch_size} results, the inbox one row at a time "
            "(no INSERT ... ON CONFLICT ... RETURNING here)"
        )
    dispatcher = get_dispatcher()
    runner = getattr(dispatcher, "description", type(dispatcher).__qualname__)
    return f"Writing results {write_path} on {connection.vendor}; recipes {runner}."


def after_ack() -> None:
    # Only what this batch resumed: looking for abandoned runs is the periodic sweep's job
    # (:func:`sweep`), not a query after every batch.
    get_dispatcher().run_pending(sweep=False)


def sweep() -> None:
    """Pick up runs that others left behind (a consumer killed mid-recipe)."""
    close_old_connections()
    ran = get_dispatcher().run_pending(limit=50)
    if ran:
        log.info("Picked up %d abandoned run(s).", ran)


def build() -> Store:
    return Store(
        write=write,
        probe=probe,
        reset=reset,
        after_ack=after_ack,
        sweep=sweep,
        transient=TRANSIENT_ERRORS,
        check=check_environ,
        count_attempt=count_attempt,
        forget_attempt=forget_attempt,
    )
