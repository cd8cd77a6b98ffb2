"""``manage.py results_inbox_cleanup``: forget received results older than the retention period.

The inbox (:class:`~oioioi.workers.models.ReceivedResult`) only has to remember a result as long
as a copy of it may still arrive: a redelivery, a retry of sioworkersd, a replayed dead letter.
Past that, upstream's own guard (the job's ``SavedEnviron`` is gone) still ignores a late copy.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from oioioi.workers.conf import setting
from oioioi.workers.logging import route_library_logs
from oioioi.workers.models import DeadLetter, DeliveryAttempt, ReceivedResult


class Command(BaseCommand):
    help = (
        "Delete received-result (inbox) records, and the attempt counts of classic-queue "
        "redeliveries, older than RESULTS_INBOX_RETENTION_DAYS, in chunks, and print how many "
        "were deleted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=int,
            help="Delete records older than this many days (default: "
            "settings.RESULTS_INBOX_RETENTION_DAYS).",
        )
        parser.add_argument(
            "--chunk-size",
            type=int,
            default=1000,
            help="Rows deleted per transaction, so that no long lock is held.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        route_library_logs()
        days = options["days"]
        if days is None:
            days = setting("RESULTS_INBOX_RETENTION_DAYS")
        if days < 0:
            raise CommandError("--days must not be negative.")
        chunk = options["chunk_size"]
        if chunk < 1:
            raise CommandError("--chunk-size must be at least 1.")
        cutoff = timezone.now() - timedelta(days=days)
        deleted = self._delete_in_chunks(
            ReceivedResult.objects.filter(received_at__lt=cutoff), chunk, options["verbosity"]
        )
        # A count left behind by a message that was then dead-lettered or lost its last consumer
        # for good is never dropped by the consumer; it ages out with the inbox.
        attempts = self._delete_in_chunks(
            DeliveryAttempt.objects.filter(last_attempt_at__lt=cutoff), chunk, 0
        )
        # A replayed or discarded dead letter is kept (without its body) so that a copy the
        # broker hands out again is recognised; as long as the inbox remembers results.
        settled = self._delete_in_chunks(
            DeadLetter.objects.exclude(settled="").filter(settled_at__lt=cutoff), chunk, 0
        )
        self.stdout.write(
            f"Deleted {deleted} received-result record(s) older than {days} day(s) "
            f"(received before {cutoff.isoformat(timespec='seconds')}), {attempts} "
            f"old delivery-attempt count(s) and {settled} old replayed or discarded dead "
            "letter(s)."
        )

    def _delete_in_chunks(self, old: Any, chunk: int, verbosity: int) -> int:
        deleted = 0
        while True:
            pks = list(old.order_by("pk").values_list("pk", flat=True)[:chunk])
            if not pks:
                return deleted
            count, _ = old.model.objects.filter(pk__in=pks).delete()
            deleted += count
            if verbosity >= 2:
                self.stdout.write(f"Deleted {deleted} so far.")
