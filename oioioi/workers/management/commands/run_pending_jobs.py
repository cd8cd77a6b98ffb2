"""``manage.py run_pending_jobs``: a sweeper for resumed jobs whose runner went away.

Every consumer already picks up abandoned pending runs every few seconds; this command does the same
without a consumer (while none runs, or beside busy ones), once or in a loop. With the Celery
hand-off (the default inside an OIOIOI) "running" a run means handing it to Celery again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, close_old_connections, reset_queries

from oioioi.workers.dispatch import get_dispatcher
from oioioi.workers.logging import route_library_logs

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run pending runs (resumed jobs) that no runner holds: left behind by a consumer that "
        "died, or whose lease expired. Once with --once, else in a loop every --interval seconds "
        "until SIGTERM or SIGINT (which let the run in hand finish; a second signal exits at once)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Run what is pending now, then exit.",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=30.0,
            help="Seconds between two sweeps in a loop (default 30).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        route_library_logs()
        if options["interval"] <= 0:
            raise CommandError("--interval must be positive.")
        if options["once"]:
            try:
                ran = self._sweep_until_done(threading.Event())
            except DatabaseError as e:
                raise CommandError(f"Database error while running pending runs: {e}") from e
            self.stdout.write(f"Ran {ran} pending run(s).")
            return
        stop = threading.Event()
        self._install_signal_handlers(stop)
        log.info("Sweeping pending runs every %.1f s.", options["interval"])
        while not stop.is_set():
            try:
                ran = self._sweep_until_done(stop)
            except DatabaseError as e:
                log.warning("Sweep failed (%s); trying again in %.1f s.", e, options["interval"])
            else:
                if ran:
                    log.info("Ran %d pending run(s).", ran)
            stop.wait(options["interval"])
        log.info("Sweeper stopped.")

    def _sweep_until_done(self, stop: threading.Event) -> int:
        # One run per call, so that a signal is noticed between runs; go on while there is work,
        # so that a backlog drains now rather than one run per interval.
        total = 0
        while not stop.is_set():
            close_old_connections()
            try:
                ran = get_dispatcher().run_pending(limit=1)
            finally:
                close_old_connections()
                reset_queries()
            total += ran
            if not ran:
                break
        return total

    def _install_signal_handlers(self, stop: threading.Event) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if stop.is_set():
                log.warning("Second %s: exiting at once.", name)
                os._exit(128 + signum)
            log.info("%s received: finishing the run in hand, then stopping.", name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
