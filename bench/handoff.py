"""A dispatcher for measuring the consumer's write alone: the hand-off without the recipe runs."""

from __future__ import annotations

from oioioi.workers.dispatch import LocalDispatcher


class HandOffOnly(LocalDispatcher):
    """Writes each resumed job's ``PendingRun`` as the local dispatcher does, and runs none of
    them: what the consumer would do if the recipes ran in another process."""

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        self._ready.clear()  # left for another process: this one forgets them
        return 0
