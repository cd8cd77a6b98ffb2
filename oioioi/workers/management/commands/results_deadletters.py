"""``manage.py results_deadletters``: see, replay, discard and purge dead-lettered results.

A thin shell over :mod:`oioioi.workers.deadletters`: dead letters are kept in the database, where
the archiver moves them from the broker's dead-letter queue (committed, then acked). Every action
first moves what still waits in the broker's queue (``--no-archive`` skips that), then works on
the table: listing and showing change nothing; a replay publishes each selected row again with
publisher confirms and marks it replayed once confirmed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q, QuerySet

from consumer.config import Settings
from consumer.errors import ConsumerError
from consumer.redact import redact_text
from oioioi.workers import deadletters
from oioioi.workers.conf import command_settings
from oioioi.workers.logging import route_library_logs
from oioioi.workers.models import DeadLetter
from results_dead_letters import diagnose, passes

#: Seconds between two progress lines of a long operation.
PROGRESS_EVERY = 1.0


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_body(body: bytes) -> str:
    """Pretty-printed JSON if it is JSON, else the text, else a byte literal."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return repr(body)
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except (ValueError, RecursionError):
        return text


def age_of(row: DeadLetter, now: float) -> float | None:
    return max(0.0, now - row.failed_at.timestamp()) if row.failed_at else None


def summary(row: DeadLetter, now: float) -> dict[str, Any]:
    return {
        "id": row.letter_id,
        "message_id": row.message_id or None,
        "reason": row.reason,
        "error": row.error or None,
        "error_class": row.error_class or None,
        "failed_at": row.failed_at.isoformat() if row.failed_at else None,
        "age_seconds": age_of(row, now),
        "delivery_count": row.delivery_count,
        "retries": row.retries,
        "replays": row.replays,
        "host": row.host or None,
        "job_id": row.job_id or None,
        "group_id": row.group_id or None,
        "submission_id": row.submission_id,
        "size": row.size,
        "content_type": row.content_type or None,
    }


def search(queryset: QuerySet[DeadLetter], term: str) -> QuerySet[DeadLetter]:
    """What the admin's search finds: part of a job, group, message or dead-letter id, or the
    exact submission id."""
    found = (
        Q(letter_id__icontains=term)
        | Q(message_id__icontains=term)
        | Q(job_id__icontains=term)
        | Q(group_id__icontains=term)
    )
    if term.isdigit():
        found |= Q(submission_id=int(term))
    return queryset.filter(found)


class Command(BaseCommand):
    help = (
        "Inspect and repair the results dead letters: list them, show one message, replay "
        "messages back into the results queue once their cause is fixed, discard or purge them. "
        "Each first moves what waits in the broker's dead-letter queue into the database "
        "(committed, then acked); listing and showing change nothing else."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

        archive = actions.add_parser(
            "archive", help="Move the dead letters waiting in the broker's queue into the database."
        )
        archive.add_argument("--limit", type=int, help="Move at most this many.")

        listing = actions.add_parser("list", help="List the dead letters, oldest first.")
        listing.add_argument("--reason", help="Only dead letters with this reason code.")
        listing.add_argument(
            "--search", help="Only those whose job, group, message or dead-letter id has this."
        )
        listing.add_argument("--limit", type=int, help="Show at most this many (default: all).")
        listing.add_argument("--json", action="store_true", help="Print JSON, one list.")

        show = actions.add_parser("show", help="Show one dead letter: headers and body.")
        show.add_argument("id", help="The dead letter's id, as 'list' prints it.")

        replay = actions.add_parser(
            "replay",
            help="Send dead letters back to the results queue (after fixing their cause).",
        )
        replay.add_argument("ids", nargs="*", metavar="ID", help="Dead letters to replay.")
        replay.add_argument("--all", action="store_true", help="Replay every dead letter.")
        replay.add_argument("--reason", help="Only dead letters with this reason code.")
        replay.add_argument("--limit", type=int, help="Replay at most this many.")
        replay.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")

        discard = actions.add_parser("discard", help="Delete some dead letters for good.")
        discard.add_argument("ids", nargs="+", metavar="ID", help="Dead letters to delete.")
        discard.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")

        purge = actions.add_parser("purge", help="Delete every dead letter for good.")
        purge.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")

        for sub in (listing, show, replay, discard, purge):
            sub.add_argument(
                "--no-archive",
                action="store_true",
                help="Work on the database only: leave the broker's queue as it is.",
            )

    def handle(self, *args: Any, **options: Any) -> None:
        route_library_logs()
        settings = command_settings()
        handler: Callable[[Settings, dict[str, Any]], None] = getattr(self, f"_{options['action']}")
        try:
            if options["action"] != "archive" and not options.get("no_archive"):
                self._archive_first(settings)
            handler(settings, options)
        except ConsumerError as e:
            raise CommandError(str(diagnose.describe_failure(e))) from e

    def _archive_first(self, settings: Settings) -> None:
        # Logged by the archiver ("Archived N dead letter(s)"), not printed: the output of
        # 'list --json' stays JSON.
        deadletters.archive(settings)

    # --- reading ---------------------------------------------------------------------------

    def _archive(self, settings: Settings, options: dict[str, Any]) -> None:
        moved = deadletters.archive(settings, limit=options["limit"])
        self.stdout.write(
            f"Moved {moved} dead letter(s) from {settings.dead_letter_queue!r} into the database."
        )

    def _list(self, settings: Settings, options: dict[str, Any]) -> None:
        rows: QuerySet[DeadLetter] = (
            DeadLetter.objects.unsettled().defer("body", "properties", "traceback").order_by("pk")
        )
        if options["reason"]:
            rows = rows.filter(reason=options["reason"])
        if options["search"]:
            rows = search(rows, options["search"])
        if options["limit"] is not None:
            rows = rows[: max(0, options["limit"])]
        letters = list(rows)
        now = time.time()
        if options["json"]:
            self.stdout.write(json.dumps([summary(d, now) for d in letters], indent=2))
            return
        if not letters:
            self.stdout.write("No dead letters.")
            return
        header = ("ID", "REASON", "AGE", "JOB", "GROUP")
        cells = [
            (d.letter_id, d.reason, format_age(age_of(d, now)), d.job_id or "-", d.group_id or "-")
            for d in letters
        ]
        widths = [max(len(r[i]) for r in [*cells, header]) for i in range(5)]
        self.stdout.write(
            "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  SIZE"
        )
        for row, letter in zip(cells, letters, strict=True):
            line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
            self.stdout.write(f"{line}  {letter.size}")
        self.stdout.write(f"{len(letters)} dead letter(s).")

    def _show(self, settings: Settings, options: dict[str, Any]) -> None:
        letter = DeadLetter.objects.unsettled().filter(letter_id=options["id"]).first()
        if letter is None:
            raise CommandError(f"No dead letter with id {options['id']!r}.")
        fields = [
            ("Id", letter.letter_id),
            ("Message id", letter.message_id or None),
            ("Reason", letter.reason),
            ("Error class", letter.error_class or None),
            ("Error", letter.error or None),
            ("Failed at", letter.failed_at.isoformat() if letter.failed_at else None),
            ("Age", format_age(age_of(letter, time.time()))),
            ("Host", letter.host or None),
            ("Deliveries", letter.delivery_count),
            ("Retries", letter.retries),
            ("Replays", letter.replays),
            ("Job id", letter.job_id or None),
            ("Group id", letter.group_id or None),
            ("Submission id", letter.submission_id),
            ("Size", letter.size),
            ("Content type", letter.content_type or None),
        ]
        for name, value in fields:
            self.stdout.write(f"{name + ':':<15}{'-' if value is None else value}")
        if letter.traceback:
            self.stdout.write("Traceback:")
            self.stdout.write(letter.traceback.rstrip())
        self.stdout.write("Headers:")
        headers = deadletters.properties_of(letter).get("headers") or {}
        self.stdout.write(json.dumps(headers, indent=2, sort_keys=True))
        self.stdout.write("Body:")
        self.stdout.write(format_body(bytes(letter.body)))

    # --- changing --------------------------------------------------------------------------

    def _replay(self, settings: Settings, options: dict[str, Any]) -> None:
        ids: list[str] = options["ids"]
        if bool(ids) == bool(options["all"]):
            raise CommandError("Give the ids of the dead letters to replay, or --all.")
        rows: QuerySet[DeadLetter] = DeadLetter.objects.unsettled()
        if ids:
            rows = rows.filter(letter_id__in=ids)
        if options["reason"]:
            rows = rows.filter(reason=options["reason"])
        if options["limit"] is not None:
            pks = list(rows.order_by("pk").values_list("pk", flat=True)[: max(0, options["limit"])])
            rows = DeadLetter.objects.unsettled().filter(pk__in=pks)
        count = rows.count()
        what = f"{count} dead letter(s)"
        if options["reason"]:
            what += f" with reason {options['reason']!r}"
        self._confirm(
            options,
            f"Replay {what} to exchange {settings.exchange!r} (key {settings.routing_key!r})?",
        )
        found = set(rows.values_list("letter_id", flat=True))
        report = deadletters.replay_all(settings, rows, progress=self._progress("Replaying"))
        self.stdout.write(f"Replayed {report.replayed}, failed {report.failed}.")
        for missing in sorted(set(ids) - found):
            self.stderr.write(f"No dead letter with id {missing!r}.")
        for letter_id, why in report.failures:
            self.stderr.write(f"{letter_id}: {redact_text(why)}")
        if report.error is not None:
            raise CommandError(
                f"Stopped after {report.replayed} replayed: "
                f"{diagnose.describe_failure(report.error)} The rest are still dead letters."
            )
        if report.failed:
            raise CommandError(
                f"{report.failed} dead letter(s) could not be replayed; they are still dead "
                "letters."
            )

    def _discard(self, settings: Settings, options: dict[str, Any]) -> None:
        ids: list[str] = options["ids"]
        self._confirm(options, f"Delete {len(ids)} dead letter(s) for good?")
        discarded = deadletters.discard(DeadLetter.objects.unsettled().filter(letter_id__in=ids))
        self.stdout.write(f"Discarded {discarded} dead letter(s).")
        if discarded < len(set(ids)):
            self.stderr.write("Some ids were not found (replayed or discarded meanwhile?).")

    def _purge(self, settings: Settings, options: dict[str, Any]) -> None:
        count = DeadLetter.objects.unsettled().count()
        self._confirm(options, f"Delete all {count} dead letter(s) for good?")
        purged = deadletters.discard(DeadLetter.objects.unsettled())
        if not options.get("no_archive"):
            # Those dead-lettered since the move above.
            purged += passes.purge(settings)
        self.stdout.write(f"Purged {purged} dead letter(s).")

    # --- helpers ---------------------------------------------------------------------------

    def _confirm(self, options: dict[str, Any], question: str) -> None:
        if options["yes"]:
            return
        if not sys.stdin.isatty():
            raise CommandError(
                "Not asking for confirmation without a terminal; pass --yes to go ahead."
            )
        self.stdout.write(f"{question} [y/N] ", ending="")
        self.stdout.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            raise CommandError("Cancelled; nothing was changed.")

    def _progress(self, verb: str) -> Callable[[deadletters.ChunkReport, int], None]:
        last = time.monotonic()

        def progress(done: deadletters.ChunkReport, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            count = done.replayed + done.failed
            if done.after is None or now - last >= PROGRESS_EVERY:
                last = now
                self.stdout.write(f"{verb}: {count}/{total} dead letters.")
                self.stdout.flush()

        return progress
