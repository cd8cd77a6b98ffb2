"""``manage.py start_receive_from_workers``: the results consumer (upstream's command name), or with
``--http-shim`` the legacy HTTP shim; both are in :mod:`oioioi.workers.programs`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from oioioi.workers import programs
from oioioi.workers.logging import route_library_logs


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
            programs.serve_shim(
                addr=options.get("addr"),
                port=options.get("port"),
                metrics_port=options.get("metrics_port"),
            )
        else:
            programs.consume(
                batch_size=options.get("batch_size"),
                prefetch=options.get("prefetch"),
                metrics_port=options.get("metrics_port"),
            )
