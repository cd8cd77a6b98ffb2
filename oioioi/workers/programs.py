"""The two programs ``manage.py start_receive_from_workers`` runs, each built from Django settings.

:func:`consume`: the results consumer (:class:`~consumer.loop.ResultsConsumer` over this app's
:mod:`~oioioi.workers.store`). :func:`serve_shim`: the legacy HTTP shim (sioworkersd's result POSTs
into the queue; it needs no database). Both stop cleanly on SIGTERM or SIGINT, and exit at once on a
second signal (:func:`stop_on_signals`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections
from django.db.migrations.executor import MigrationExecutor

from consumer.config import Settings
from consumer.loop import ResultsConsumer, Store
from oioioi.workers import deadletters, observability, store
from oioioi.workers.conf import command_settings, setting
from oioioi.workers.dispatch import get_dispatcher
from results_shim import server as shim
from results_shim.server import ShimConfig

log = logging.getLogger(__name__)


def consume(
    *, batch_size: int | None = None, prefetch: int | None = None, metrics_port: int | None = None
) -> None:
    """Run the results consumer until it is stopped."""
    settings = command_settings(batch_size=batch_size, prefetch=prefetch)
    check_migrations()
    try:
        get_dispatcher()
    except ImportError as e:
        raise CommandError(f"Invalid EVALMGR_DISPATCHER: {e}") from e
    log.info("%s", store.describe(settings))
    metrics = observability.start(metrics_port)
    consumer = ResultsConsumer(settings, consumer_store(settings), observer=metrics.observer)
    stop_on_signals(
        consumer.stop, consumer.shutdown.is_set, "finishing the message in hand, then stopping"
    )
    try:
        consumer.run()
    finally:
        metrics.close()


def consumer_store(settings: Settings) -> Store:
    """The consumer's store; with ``RESULTS_DEAD_LETTER_ARCHIVE``, its sweep also archives."""
    built = store.build()
    if not setting("RESULTS_DEAD_LETTER_ARCHIVE"):
        return built
    # Every few seconds, after the sweep: dead letters move from the broker into the
    # database (committed, then acked), where the operator pages list them.
    sweep, archive = built.sweep, deadletters.archive_step(settings)

    def sweep_and_archive() -> None:
        sweep()
        archive()

    log.info("Dead letters are moved into the database every few seconds.")
    return dataclasses.replace(built, sweep=sweep_and_archive)


def check_migrations() -> None:
    """Refuse to start on a database with unapplied migrations; one not reachable yet is waited
    for by the consumer."""
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


def serve_shim(
    *, addr: str | None = None, port: int | None = None, metrics_port: int | None = None
) -> None:
    """Run the HTTP shim until it is stopped; ``addr`` and ``port`` default to the settings."""
    # No migration check: the shim never touches the database, and must not need it.
    config = shim_config()
    addr = addr or setting("SIOWORKERS_LISTEN_ADDR")
    port = setting("SIOWORKERS_LISTEN_PORT") if port is None else port
    servers: list[shim.Server] = []
    stop_on_signals(
        lambda: servers[0].stop(),
        # A signal before the server is up has nothing to finish.
        lambda: not servers or servers[0].stopping,
        "finishing requests in progress, then stopping",
    )
    settings = command_settings()
    metrics = observability.start(metrics_port, watch_broker=settings)
    try:
        shim.serve(settings, config, addr, port, observer=metrics.observer, on_ready=servers.append)
    except OSError as e:
        raise CommandError(f"Cannot listen on {addr}:{port}: {e}") from e
    finally:
        metrics.close()


def shim_config() -> ShimConfig:
    """The shim's settings (``SHIM_*``)."""
    try:
        return ShimConfig(
            max_body_bytes=setting("SHIM_MAX_BODY_BYTES"),
            threads=setting("SHIM_THREADS"),
            read_timeout=setting("SHIM_READ_TIMEOUT"),
            auth_token=setting("SHIM_AUTH_TOKEN"),
            publish_timeout=setting("SHIM_PUBLISH_TIMEOUT"),
        )
    except ValueError as e:
        raise CommandError(f"Invalid SHIM_* setting: {e}") from e


def stop_on_signals(stop: Callable[[], None], stopping: Callable[[], bool], then: str) -> None:
    """On SIGTERM or SIGINT call ``stop``, saying what happens ``then``; when ``stopping`` says a
    stop is under way already (or there is nothing to stop yet), exit at once."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopping():
            log.warning("Second %s: exiting at once.", name)
            os._exit(128 + signum)
        log.info("%s received: %s.", name, then)
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
