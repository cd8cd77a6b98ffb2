"""Dead letters kept in the database: the archiver, replay and discard.

The broker's dead-letter queue is only a buffer. The archiver moves each dead letter into the
:class:`~oioioi.workers.models.DeadLetter` table as the consumer moves results: a batch is
committed, and only then acked (:func:`results_dead_letters.archiving.archive`). A copy that comes back
after a crash between the two, or an ack the broker lost with its connection (same dead-letter
id), is ignored, even once the row was replayed or discarded: a settled row stays, without its
body, as long as the inbox remembers results. So nothing is lost and nothing is listed twice. While the database is away the messages stay in the queue. The consumer runs
the archiver every few seconds (:func:`archive_step`), ``manage.py results_deadletters archive``
on demand.

A replay publishes each selected row's body again, with its properties, waits for the broker's
confirm, and only then marks the row replayed (:func:`replay_chunk`); a row whose copy the broker refuses
stays. Rows are taken in chunks, in the order of their primary key, from a cursor the caller
keeps, so that a long selection shows its progress and each request stays short. Looking at the
table (the admin's list, search and detail, the command's ``list`` and ``show``) never touches
the broker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import Count, QuerySet
from django.utils import timezone

from consumer.config import Settings
from consumer.errors import ConsumerError, PublishError
from oioioi.workers.models import DeadLetter
from oioioi.workers.status import CONNECT_TIMEOUT, tune_short
from results_dead_letters import archiving
from results_dead_letters.errors import TopologyMissing
from results_dead_letters.letters import DeadLetter as QueuedLetter

log = logging.getLogger(__name__)

#: Most dead letters one archiver step of the consumer moves (the consumer's batches wait while
#: it runs: about a second's worth).
ARCHIVE_STEP_LIMIT = 1000

#: Seconds any broker call of the pages and commands may take (the status panel's timeout).
BROKER_CALL_TIMEOUT = 2 * CONNECT_TIMEOUT

#: What a failed broker call of these operations raises (pika's errors are wrapped in ours).
BROKER_ERRORS: tuple[type[BaseException], ...] = (ConsumerError, OSError)

#: Most rows one replay chunk takes, and about how long it may run.
CHUNK_ROWS = 500
CHUNK_SECONDS = 1.0


def _row(letter: QueuedLetter) -> DeadLetter:
    return DeadLetter(
        letter_id=letter.id[:255],
        message_id=(letter.message_id or "")[:255],
        reason=letter.reason[:64],
        error=letter.error or "",
        error_class=(letter.error_class or "")[:255],
        traceback=letter.traceback or "",
        failed_at=letter.failed_at,
        delivery_count=letter.delivery_count,
        retries=letter.retries,
        replays=letter.replays,
        host=(letter.host or "")[:255],
        job_id=(letter.job_id or "")[:255],
        group_id=(letter.group_id or "")[:255],
        submission_id=letter.submission_id,
        size=letter.size,
        content_type=(letter.content_type or "")[:255],
        properties=json.dumps(letter.properties, ensure_ascii=False),
        body=letter.body,
    )


def store(letters: list[QueuedLetter]) -> None:
    """Commit ``letters`` to the table; one already there (same dead-letter id) is left as it is."""
    with transaction.atomic(durable=True):
        DeadLetter.objects.bulk_create(
            [_row(letter) for letter in letters], ignore_conflicts=True, batch_size=200
        )


def archive(settings: Settings, *, limit: int | None = None, short: bool = True) -> int:
    """Move dead letters from the broker into the table (committed, then acked); how many moved.

    ``short``: every broker call bounded by :data:`BROKER_CALL_TIMEOUT` (pages and commands).
    """
    return archiving.archive(
        settings,
        store,
        limit=limit,
        tune=tune_short if short else None,
        timeout=BROKER_CALL_TIMEOUT if short else None,
    )


def archive_step(settings: Settings) -> Callable[[], None]:
    """What the consumer runs every few seconds (on its database thread): one archiver step."""

    def step() -> None:
        # Only when the database answers: a batch the store cannot commit goes back to the
        # queue, and a quorum queue of RabbitMQ 4 counts each return against a delivery limit.
        DeadLetter.objects.exists()
        try:
            archive(settings, limit=ARCHIVE_STEP_LIMIT)
        except TopologyMissing as e:
            # The consumer's first step runs before it has connected and declared its queues.
            log.info("No dead letters to archive yet: %s.", e)
        except Exception:
            log.warning(
                "Archiving dead letters failed; they stay in the dead-letter queue.",
                exc_info=True,
            )

    return step


def reason_counts(queryset: QuerySet[DeadLetter]) -> list[tuple[str, int]]:
    """``(reason, count)`` of the rows not yet settled, in one query."""
    rows = queryset.filter(settled="").order_by().values_list("reason").annotate(n=Count("pk"))
    return sorted((reason, n) for reason, n in rows)


@dataclass
class ChunkReport:
    """What one replay chunk did."""

    replayed: int = 0
    failed: int = 0
    #: ``(dead-letter id, why)`` of each row the broker refused (it stays in the table).
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: The primary key to continue after; None when the selection is done (or the broker failed).
    after: int | None = None
    #: The broker's failure that stopped the chunk (what it confirmed before is replayed).
    error: BaseException | None = None


def replay_chunk(
    settings: Settings,
    queryset: QuerySet[DeadLetter],
    after: int = 0,
    *,
    rows: int = CHUNK_ROWS,
    seconds: float = CHUNK_SECONDS,
) -> ChunkReport:
    """Replay the next rows of ``queryset`` after primary key ``after``: publish, confirm, delete.

    Rows are locked while they are replayed (skipped if another replay holds them, where the
    database can), so two operators replaying the same selection do not send a row twice.
    Raises a broker error (nothing of this chunk deleted but what was confirmed) when the broker
    fails; a row the broker refuses (unroutable, nacked) stays in the table and is reported.
    """
    report = ChunkReport()
    started = time.monotonic()
    with transaction.atomic():
        chunk = list(
            queryset.filter(pk__gt=after, settled="")
            .order_by("pk")
            .select_for_update(skip_locked=True, of=("self",))
            .only("pk", "letter_id", "job_id", "message_id", "body", "properties")[:rows]
        )
        if not chunk:
            return report
        confirmed: list[int] = []
        try:
            with archiving.Republisher(
                settings, tune=tune_short, timeout=BROKER_CALL_TIMEOUT
            ) as publisher:
                for row in chunk:
                    try:
                        publisher.replay(bytes(row.body), properties_of(row))
                    except PublishError as e:
                        if not publisher.is_usable():
                            raise
                        report.failed += 1
                        report.failures.append((row.letter_id, str(e)))
                        log.warning("Dead letter %r could not be replayed: %s", row.letter_id, e)
                    else:
                        confirmed.append(row.pk)
                        log.info(
                            "Dead letter %r replayed.",
                            row.letter_id,
                            extra={"message_id": row.message_id, "job_id": row.job_id},
                        )
                    report.after = row.pk
                    if time.monotonic() - started > seconds:
                        break
        except BROKER_ERRORS as e:
            # Not raised from inside the transaction: the rows of the copies the broker has
            # confirmed must go (they are in the results queue), and a rollback would keep them.
            report.error = e
            report.after = None
        _settle(DeadLetter.objects.filter(pk__in=confirmed), "replayed")
        report.replayed = len(confirmed)
    return report


def replay_all(
    settings: Settings,
    queryset: QuerySet[DeadLetter],
    progress: Callable[[ChunkReport, int], None] | None = None,
) -> ChunkReport:
    """Replay every row of ``queryset`` (as it is now: rows archived later are left), chunk by
    chunk; ``progress`` gets the running totals and the selection's size."""
    queryset = queryset.filter(settled="")
    upto = queryset.order_by("-pk").values_list("pk", flat=True).first()
    total = queryset.count()
    done = ChunkReport(after=0)
    if upto is None:
        return done
    selection = queryset.filter(pk__lte=upto)
    while done.after is not None:
        chunk = replay_chunk(settings, selection, done.after)
        done.replayed += chunk.replayed
        done.failed += chunk.failed
        done.failures.extend(chunk.failures)
        done.after = chunk.after
        done.error = chunk.error
        if progress is not None:
            progress(done, total)
    return done


def _settle(queryset: QuerySet[DeadLetter], how: str) -> int:
    # The row stays, without its body: a copy the broker hands out again is not listed again.
    return DeadLetter.objects.filter(
        pk__in=queryset.filter(settled="").order_by().values("pk")
    ).update(settled=how, settled_at=timezone.now(), body=b"", properties="{}")


def discard(queryset: QuerySet[DeadLetter]) -> int:
    """Remove the rows from the dead letters for good; returns how many."""
    discarded = _settle(queryset, "discarded")
    if discarded:
        log.info("Discarded %d dead letter(s).", discarded)
    return discarded


def properties_of(row: DeadLetter) -> dict[str, Any]:
    try:
        value = json.loads(row.properties or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
