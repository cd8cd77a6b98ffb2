"""``manage.py start_receive_from_workers``: the results consumer (upstream's command name)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections
from django.db.migrations.executor import MigrationExecutor

from consumer.config import Settings
from consumer.loop import ResultsConsumer, Store
from oioioi.workers import deadletters, observability
from oioioi.workers import store as database_store
from oioioi.workers.conf import command_settings, setting
from oioioi.workers.dispatch import get_dispatcher
from oioioi.workers.logging import route_library_logs
from results_shim import server as shim
from results_shim.server import ShimConfig

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
        parser.add_argument(
            "--metrics-port",
            type=int,
            help="Serve /healthz, /readyz and /metrics on this port (default: METRICS_PORT; "
            "off when neither is set).",
        )
        parser.add_argument(
            "--http-shim",
            action="store_true",
            help="Instead of consuming, run the legacy HTTP shim: accept sioworkersd's result POSTs "
            "and forward them into the queue (needs no database).",
        )
        parser.add_argument(
            "--addr", help="Shim: address to listen on (default: SIOWORKERS_LISTEN_ADDR)."
        )
        parser.add_argument(
            "--port", type=int, help="Shim: port to listen on (default: SIOWORKERS_LISTEN_PORT)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        route_library_logs()
        if options.get("http_shim"):
            self._run_shim(options)
            return
        settings = command_settings(
            batch_size=options.get("batch_size"), prefetch=options.get("prefetch")
        )
        self._check_migrations()
        try:
            get_dispatcher()
        except ImportError as e:
            raise CommandError(f"Invalid EVALMGR_DISPATCHER: {e}") from e
        log.info("%s", database_store.describe(settings))
        metrics = observability.start(options.get("metrics_port"))
        consumer = ResultsConsumer(settings, self._store(settings), observer=metrics.observer)
        self._install_signal_handlers(consumer)
        try:
            consumer.run()
        finally:
            metrics.close()

    def _store(self, settings: Settings) -> Store:
        store = database_store.build()
        if not setting("RESULTS_DEAD_LETTER_ARCHIVE"):
            return store
        # Every few seconds, after the sweep: dead letters move from the broker into the
        # database (committed, then acked), where the operator pages list them.
        sweep, archive = store.sweep, deadletters.archive_step(settings)

        def sweep_and_archive() -> None:
            sweep()
            archive()

        log.info("Dead letters are moved into the database every few seconds.")
        return dataclasses.replace(store, sweep=sweep_and_archive)

    def _run_shim(self, options: dict[str, Any]) -> None:
        # No migration check: the shim never touches the database, and must not need it.
        try:
            config = ShimConfig(
                max_body_bytes=setting("SHIM_MAX_BODY_BYTES"),
                threads=setting("SHIM_THREADS"),
                read_timeout=setting("SHIM_READ_TIMEOUT"),
                auth_token=setting("SHIM_AUTH_TOKEN"),
                publish_timeout=setting("SHIM_PUBLISH_TIMEOUT"),
            )
        except ValueError as e:
            raise CommandError(f"Invalid SHIM_* setting: {e}") from e
        addr = options.get("addr") or setting("SIOWORKERS_LISTEN_ADDR")
        port = options.get("port")
        port = setting("SIOWORKERS_LISTEN_PORT") if port is None else port
        servers: list[shim.Server] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if not servers or servers[0].stopping:
                log.warning("Second %s: exiting at once.", name)
                os._exit(128 + signum)
            log.info("%s received: finishing requests in progress, then stopping.", name)
            servers[0].stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        settings = command_settings()
        metrics = observability.start(options.get("metrics_port"), watch_broker=settings)
        try:
            shim.serve(
                settings,
                config,
                addr,
                port,
                observer=metrics.observer,
                on_ready=servers.append,
            )
        except OSError as e:
            raise CommandError(f"Cannot listen on {addr}:{port}: {e}") from e
        finally:
            metrics.close()

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
