"""``manage.py results_deadletters``: see, replay, discard and purge dead-lettered results.

A thin shell over :mod:`consumer.deadletters`; what each operation does to the queue (and why
nothing is lost when it is cut short) is written there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from consumer import deadletters
from consumer.config import Settings
from consumer.errors import ConsumerError
from consumer.redact import redact_text
from oioioi.workers.conf import command_settings
from oioioi.workers.logging import route_library_logs

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


class Command(BaseCommand):
    help = (
        "Inspect and repair the results dead-letter queue: list it, show one message, replay "
        "messages back into the results queue once their cause is fixed, discard or purge them. "
        "Listing and showing leave the queue as it was."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

        listing = actions.add_parser("list", help="List the dead letters, oldest first.")
        listing.add_argument("--reason", help="Only dead letters with this reason code.")
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

    def handle(self, *args: Any, **options: Any) -> None:
        route_library_logs()
        settings = command_settings()
        handler: Callable[[Settings, dict[str, Any]], None] = getattr(self, f"_{options['action']}")
        try:
            handler(settings, options)
        except ConsumerError as e:
            raise CommandError(redact_text(str(e))) from e

    # --- reading ---------------------------------------------------------------------------

    def _list(self, settings: Settings, options: dict[str, Any]) -> None:
        letters = deadletters.browse(
            settings, limit=None if options["reason"] else options["limit"]
        )
        if options["reason"]:
            letters = [d for d in letters if d.reason == options["reason"]]
            if options["limit"] is not None:
                letters = letters[: options["limit"]]
        now = time.time()
        if options["json"]:
            self.stdout.write(json.dumps([d.summary(now) for d in letters], indent=2))
            return
        if not letters:
            self.stdout.write(f"No dead letters in {settings.dead_letter_queue!r}.")
            return
        rows = [
            (d.id, d.reason, format_age(d.age_seconds(now)), d.job_id or "-", d.group_id or "-")
            for d in letters
        ]
        widths = [
            max(len(r[i]) for r in [*rows, ("ID", "REASON", "AGE", "JOB", "GROUP")])
            for i in range(5)
        ]
        header = ("ID", "REASON", "AGE", "JOB", "GROUP")
        self.stdout.write(
            "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  SIZE"
        )
        for row, letter in zip(rows, letters, strict=True):
            cells = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
            self.stdout.write(f"{cells}  {letter.size}")
        self.stdout.write(f"{len(letters)} dead letter(s).")

    def _show(self, settings: Settings, options: dict[str, Any]) -> None:
        letter = deadletters.get(settings, options["id"])
        if letter is None:
            raise CommandError(f"No dead letter with id {options['id']!r}.")
        fields = [
            ("Id", letter.id),
            ("Message id", letter.message_id),
            ("Reason", letter.reason),
            ("Error class", letter.error_class),
            ("Error", letter.error),
            ("Failed at", letter.failed_at.isoformat() if letter.failed_at else None),
            ("Age", format_age(letter.age_seconds())),
            ("Host", letter.host),
            ("Deliveries", letter.delivery_count),
            ("Retries", letter.retries),
            ("Job id", letter.job_id),
            ("Group id", letter.group_id),
            ("Submission id", letter.submission_id),
            ("Size", letter.size),
            ("Content type", letter.content_type),
        ]
        for name, value in fields:
            self.stdout.write(f"{name + ':':<15}{'-' if value is None else value}")
        self.stdout.write("Headers:")
        self.stdout.write(
            json.dumps(deadletters.jsonable(letter.headers), indent=2, sort_keys=True)
        )
        self.stdout.write("Body:")
        self.stdout.write(format_body(letter.body))

    # --- changing --------------------------------------------------------------------------

    def _replay(self, settings: Settings, options: dict[str, Any]) -> None:
        ids: list[str] = options["ids"]
        if bool(ids) == bool(options["all"]):
            raise CommandError("Give the ids of the dead letters to replay, or --all.")
        if ids:
            what = f"{len(ids)} dead letter(s)"
        else:
            what = f"every dead letter ({deadletters.depth(settings)} in the queue)"
        if options["reason"]:
            what += f" with reason {options['reason']!r}"
        self._confirm(
            options,
            f"Replay {what} to exchange {settings.exchange!r} (key {settings.routing_key!r})?",
        )
        report = deadletters.replay(
            settings,
            ids or None,
            reason=options["reason"],
            limit=options["limit"],
            progress=self._progress("Replaying"),
        )
        self.stdout.write(
            f"Replayed {report.replayed}, skipped {report.skipped}, failed {report.failed}."
        )
        for missing in report.not_found:
            self.stderr.write(f"No dead letter with id {missing!r}.")
        for letter_id, why in report.failures:
            self.stderr.write(f"{letter_id}: {why}")
        if report.failed:
            raise CommandError(
                f"{report.failed} dead letter(s) could not be replayed; "
                "they are still in the dead-letter queue."
            )

    def _discard(self, settings: Settings, options: dict[str, Any]) -> None:
        ids: list[str] = options["ids"]
        self._confirm(options, f"Delete {len(ids)} dead letter(s) for good?")
        discarded = deadletters.discard(settings, ids, progress=self._progress("Discarding"))
        self.stdout.write(f"Discarded {discarded} dead letter(s).")
        if discarded < len(set(ids)):
            self.stderr.write("Some ids were not found (replayed or discarded meanwhile?).")

    def _purge(self, settings: Settings, options: dict[str, Any]) -> None:
        count = deadletters.depth(settings)
        self._confirm(
            options,
            f"Delete all {count} dead letter(s) in {settings.dead_letter_queue!r} for good?",
        )
        purged = deadletters.purge(settings)
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

    def _progress(self, verb: str) -> Callable[[int, int], None]:
        last = time.monotonic()

        def progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if done == total or now - last >= PROGRESS_EVERY:
                last = now
                self.stdout.write(f"{verb}: {done}/{total} dead letters looked at.")
                self.stdout.flush()

        return progress
