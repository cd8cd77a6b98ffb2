"""What the consumer reports as it works; the default observer ignores it all.

Metrics exporters implement :class:`Observer`; the loop calls it on the message path, so an
implementation must be cheap and must never raise.
"""

from __future__ import annotations


class Observer:
    def received(self, count: int) -> None: ...

    def settled(self, outcome: str, count: int = 1) -> None:
        """``outcome``: committed, duplicate, dead-lettered, retried."""

    def dead_lettered(self, reason: str) -> None: ...

    def write_seconds(self, seconds: float, batch_size: int) -> None: ...

    def age_seconds(self, seconds: float) -> None:
        """Time from publish (the message's timestamp) to commit."""

    def database_pause(self) -> None: ...

    def reconnected(self) -> None: ...

    def connected(self, up: bool) -> None: ...

    def database_up(self, up: bool) -> None: ...

    def request(self, status: int, seconds: float) -> None:
        """The HTTP shim answered a request with ``status`` after ``seconds``."""
