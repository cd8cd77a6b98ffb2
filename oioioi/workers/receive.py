"""The database side of the consumer: applying results through ``delay_environ``.

Everything here runs on the consumer's database thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.db import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    transaction,
)

from consumer.consumer import Store
from consumer.decode import Result
from consumer.errors import RejectedEnviron
from oioioi.evalmgr.dispatch import get_dispatcher
from oioioi.evalmgr.tasks import delay_environ
from oioioi.workers.models import ReceivedResult

log = logging.getLogger(__name__)

#: Database errors worth retrying: the connection broke, the server restarts, a lock or
#: serialization conflict, SQLite busy. Django wraps every driver's errors in these two.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)

#: Fields the sioworkers restore function refuses in a resuming environ.
_STRIPPED_FIELDS = ("recipe", "error_handlers")


def check_environ(env: dict[str, Any]) -> None:
    """Refuse, as permanent, an environ that ``delay_environ`` could never apply."""
    job_id = env.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        raise RejectedEnviron("environ has no 'job_id'")
    if "saved_environ_id" in env:
        saved_id = env["saved_environ_id"]
        if isinstance(saved_id, bool) or not isinstance(saved_id, int):
            raise RejectedEnviron(f"'saved_environ_id' must be an integer, not {saved_id!r}")
        for field in _STRIPPED_FIELDS:
            if field in env:
                raise RejectedEnviron(f"a resuming environ must not contain {field!r}")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _apply(result: Result) -> str:
    env = result.env
    check_environ(env)
    try:
        # The inbox row goes first, in a savepoint: on PostgreSQL a second consumer writing the
        # same message blocks on the unique key until the first commits, then fails here before
        # it has done anything.
        with transaction.atomic():
            ReceivedResult.objects.create(
                key=result.key,
                message_id=result.message_id or "",
                group_id=str(env.get("group_id") or "")[:255],
                job_id=env["job_id"][:255],
                submission_id=_int_or_none(env.get("submission_id")),
                saved_environ_id=_int_or_none(env.get("saved_environ_id")),
                outcome="resumed",
            )
    except IntegrityError:
        return "duplicate"
    if delay_environ(dict(env)) is None:
        ReceivedResult.objects.filter(key=result.key).update(outcome="ignored")
    return "committed"


def write(results: Sequence[Result]) -> list[str]:
    """Apply results in one durable transaction; committed when this returns."""
    close_old_connections()
    known = set(
        ReceivedResult.objects.filter(key__in=[r.key for r in results]).values_list(
            "key", flat=True
        )
    )
    outcomes: list[str] = []
    with transaction.atomic(durable=True):
        for result in results:
            outcomes.append("duplicate" if result.key in known else _apply(result))
            known.add(result.key)
    return outcomes


def probe() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def reset() -> None:
    connection.close()


def after_ack() -> None:
    get_dispatcher().run_pending()


def idle() -> None:
    close_old_connections()
    ran = get_dispatcher().run_pending(limit=50)
    if ran:
        log.info("Picked up %d abandoned run(s).", ran)


def store() -> Store:
    return Store(
        write=write,
        probe=probe,
        reset=reset,
        after_ack=after_ack,
        idle=idle,
        transient=TRANSIENT_ERRORS,
    )
