"""Which database errors are the database's, not a message's or a job's: the one classification.

The consumer retries these and, past its budget, holds its messages until the database answers
(:mod:`consumer.policy`); the recipe runner leaves a run for a retry instead of running the job's
error handlers. Both name the same errors through :data:`TRANSIENT_ERRORS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from django.db import InterfaceError, InternalError, OperationalError

P = ParamSpec("P")
R = TypeVar("R")


class ReadOnlyDatabase(OperationalError):
    """Raised when the server refuses writes: a failover to a read-only replica is under way."""


#: Database errors worth retrying: the connection broke, the server restarts, a lock or
#: serialization conflict, SQLite busy, a server that refuses writes (:class:`ReadOnlyDatabase`).
#: Django wraps every driver's errors in these two.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)

#: PostgreSQL's SQLSTATE for "cannot execute ... in a read-only transaction".
_READ_ONLY_SQLSTATE = "25006"


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a database error Django wrapped: psycopg 3 names it ``sqlstate``,
    psycopg2 ``pgcode``."""
    cause = error.__cause__
    return getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)


def read_only_is_transient(func: Callable[P, R]) -> Callable[P, R]:
    """Re-raise a refused write on a read-only server as :class:`ReadOnlyDatabase`.

    Drivers report it as an internal error (SQLSTATE class 25), which says nothing about the
    message: it must wait for the primary like any other outage, not go to the retry queue.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except InternalError as e:
            if sqlstate(e) == _READ_ONLY_SQLSTATE:
                raise ReadOnlyDatabase(str(e)) from e
            raise

    return wrapper
