"""The operator pages' permissions (defined on :class:`~oioioi.workers.models.DeadLetterQueue`)."""

from __future__ import annotations

#: See the dead-letter queue, its messages, and the status panel on the admin index.
VIEW_PERMISSION = "workers.view_deadletters"

#: Replay or discard dead-lettered messages (also needs :data:`VIEW_PERMISSION`).
REPLAY_PERMISSION = "workers.replay_deadletters"
