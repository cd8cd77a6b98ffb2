"""``manage.py start_receive_from_workers``: the results consumer (upstream's command name)."""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections
from django.db.migrations.executor import MigrationExecutor

from consumer.consumer import ResultsConsumer
from oioioi.workers import receive
from oioioi.workers.conf import consumer_settings

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Consume finished evaluation environs from RabbitMQ and resume their jobs; each message "
        "is acknowledged only after its database write has committed. Stops cleanly on SIGTERM "
        "or SIGINT (a second signal exits at once)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--batch-size", type=int, help="Most results written in one transaction."
        )
        parser.add_argument(
            "--prefetch", type=int, help="Unacknowledged deliveries the broker may push ahead."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings = consumer_settings(
            batch_size=options.get("batch_size"), prefetch=options.get("prefetch")
        )
        self._check_migrations()
        consumer = ResultsConsumer(settings, receive.store())
        self._install_signal_handlers(consumer)
        consumer.run()

    def _check_migrations(self) -> None:
        try:
            executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        except OperationalError as e:
            log.warning("Database not reachable at start (%s); the consumer will wait for it.", e)
            return
        finally:
            connections.close_all()
        if plan:
            raise CommandError(
                "The database has unapplied migrations; run 'python manage.py migrate' first."
            )

    def _install_signal_handlers(self, consumer: ResultsConsumer) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if consumer.shutdown.is_set():
                log.warning("Second %s: exiting at once.", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info(
                "%s received: finishing the message in hand, then stopping.",
                signal.Signals(signum).name,
            )
            consumer.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
