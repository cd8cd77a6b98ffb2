"""Retry policies built from settings: transient database errors, probes, reconnects."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_random_exponential,
)

from consumer.config import Settings

log = logging.getLogger(__name__)


def database_retrying(
    settings: Settings,
    transient: tuple[type[BaseException], ...],
    shutdown: threading.Event,
    reset: Callable[[], None],
) -> Retrying:
    """Retry a write on ``transient`` errors only; ``reset`` runs before each new attempt."""
    before_sleep_logger = before_sleep_log(log, logging.WARNING)

    def before_sleep(state: Any) -> None:
        before_sleep_logger(state)
        reset()

    return Retrying(
        retry=retry_if_exception_type(transient),
        stop=stop_after_attempt(settings.db_retry_attempts) | stop_when_event_set(shutdown),
        wait=wait_random_exponential(
            multiplier=settings.db_retry_initial, max=settings.db_retry_max
        ),
        before_sleep=before_sleep,
        reraise=True,
    )


class Backoff:
    """Exponential backoff with full jitter for loops that are not a single call (probes)."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._wait = wait_random_exponential(multiplier=initial, max=maximum)
        self.attempt = 0

    def next(self) -> float:
        self.attempt += 1
        return float(self._wait(_State(self.attempt)))  # type: ignore[arg-type]

    def reset(self) -> None:
        self.attempt = 0


class _State:
    """The part of tenacity's RetryCallState that wait strategies read."""

    def __init__(self, attempt: int) -> None:
        self.attempt_number = attempt
        self.outcome = None
        self.seconds_since_start = 0.0
