"""Transaction guards of the return path's own steps."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import transaction

F = TypeVar("F", bound=Callable[..., Any])


def require_transaction(func: F) -> F:
    """Refuse to run ``func`` outside ``transaction.atomic()``: its writes belong to the
    caller's transaction (and commit or roll back with it)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not transaction.get_connection().in_atomic_block:
            raise RuntimeError(f"{func.__qualname__} must be called inside a transaction")
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
