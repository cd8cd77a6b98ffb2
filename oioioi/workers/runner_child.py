"""The recipe runner process's own life (:mod:`oioioi.workers.runner_process` starts it).

Imported by a fresh interpreter before Django is set up: nothing here imports models at the top.
"""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("oioioi.workers.runner_process")

#: How often runs stopped by the database are tried again, in seconds.
RETRY_SECONDS = 1.0


def main(pipe: Connection, settings_module: str) -> None:
    """The runner's life: set Django up, then run what the consumer hands over until it stops."""
    # The consumer decides when both stop; a signal to the whole group must not cut a phase.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if settings_module:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    import django

    django.setup()
    from oioioi.workers.dispatch import LocalDispatcher
    from oioioi.workers.logging import route_library_logs

    route_library_logs()
    dispatcher = LocalDispatcher()
    pipe.send(("ready",))
    while True:
        try:
            # Runs stopped by the database are tried again every second until they run.
            if not pipe.poll(RETRY_SECONDS if dispatcher.holding else None):
                _unit(dispatcher.run_pending, sweep=False)
                continue
            message = pipe.recv()
        except (EOFError, OSError):
            break  # the consumer is gone: what this process held is taken over later
        if message[0] == "stop":
            break
        try:
            run(dispatcher, message)
        finally:
            try:
                pipe.send(("done",))
            except OSError:
                break
    pipe.close()


def run(dispatcher: Any, message: tuple[Any, ...]) -> int:
    """Run what one message hands over, with a :class:`~oioioi.workers.dispatch.LocalDispatcher`:
    ``("written", token, keys)``, a batch the consumer wrote and claimed, or ``("abandoned",
    keys)``, runs nobody holds."""
    if message[0] == "written":
        return _unit(dispatcher.run_written, message[1], message[2])
    return sum(_unit(dispatcher.run_abandoned, pk) for pk in message[1])


def _unit(func: Any, *args: Any, **kwargs: Any) -> int:
    """One unit of work, with connections handled around it as Django handles them around a
    request; a failure is logged and left to the claims (the runs stay held or claimed)."""
    from django.db import close_old_connections

    close_old_connections()
    try:
        return int(func(*args, **kwargs))
    except Exception:
        log.warning("Running pending runs stopped; they will be run again.", exc_info=True)
        return 0
    finally:
        close_old_connections()
