"""Dead letters moved out of the broker's queue into an archive, and archived ones sent back.

:func:`archive` moves dead letters into a store the caller gives (the Django side's database
table), committed first, acked after; :class:`Republisher` sends archived ones back to the results
exchange, confirmed; :func:`queue_depth` counts what still waits in the queue. The operator pages
and commands work on that archive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from consumer.config import Settings
from consumer.transport import Connection, Tune
from results_dead_letters.errors import exchange_must_exist, queue_must_exist
from results_dead_letters.letters import (
    DeadLetter,
    from_message,
    properties_from_dict,
    replay_properties,
)

#: The queue library's logger tree, so one logging setup covers every line of the return path.
log = logging.getLogger("consumer.deadletters")

#: Stores dead letters durably; returns only once they are committed (raises if they are not).
ArchiveStore = Callable[[list[DeadLetter]], None]


def archive(
    settings: Settings,
    store: ArchiveStore,
    *,
    limit: int | None = None,
    batch: int = 500,
    tune: Tune | None = None,
    timeout: float | None = None,
) -> int:
    """Move dead letters from the queue into ``store``: each batch is committed, then acked.

    Taken from the queue's head, up to ``batch`` at a time, at most ``limit`` in all (the whole
    queue by default). A batch is acked, with one ``multiple`` ack, only after ``store`` has
    returned; if ``store`` raises, or the process dies first, the connection closes and the
    broker puts the batch back, so a dead letter is always in the queue, in the store, or (after
    a crash between commit and ack, or an ack the broker lost) in both, in which case the store
    must ignore the second copy (same :attr:`DeadLetter.id`), even after the first was replayed.
    ``timeout`` bounds each broker call. Returns how many moved.
    """
    if limit is not None and limit <= 0:
        return 0
    connection = Connection(settings, name="oioioi-deadletter-archiver", tune=tune)
    moved = 0
    try:
        with connection.doing("archiving the dead-letter queue"):
            with connection.within(timeout):
                channel = connection.channel()
                queue_must_exist(channel, settings.dead_letter_queue, "the dead-letter queue")
            pending: list[DeadLetter] = []
            last_tag = 0
            while True:
                # Each ack is followed by a get: the broker has applied an ack once it answers a
                # later get on the same channel. A quorum queue (RabbitMQ 3.10, measured) hands
                # out again messages whose ack was still on its way when the connection closed.
                full = limit is not None and moved + len(pending) >= limit
                if len(pending) >= batch or full:
                    store(pending)
                    with connection.within(timeout):
                        channel.ack(last_tag, multiple=True)
                    moved += len(pending)
                    pending = []
                    if full:
                        # The get that settles the ack; a message it takes goes back when the
                        # connection closes (and is archived next time).
                        with connection.within(timeout):
                            channel.get(settings.dead_letter_queue)
                        break
                with connection.within(timeout):
                    got = channel.get(settings.dead_letter_queue)
                if got is None:
                    if pending:
                        store(pending)
                        with connection.within(timeout):
                            channel.ack(last_tag, multiple=True)
                        moved += len(pending)
                        pending = []
                        continue  # the get that settles the ack
                    break
                pending.append(from_message(got.properties, got.body))
                last_tag = got.tag
    finally:
        connection.close()
    if moved:
        log.info(
            "Archived %d dead letter(s) from %r.",
            moved,
            settings.dead_letter_queue,
            extra={"outcome": "archived", "count": moved},
        )
    return moved


class Republisher:
    """Sends dead letters kept elsewhere (an archive) back to the results exchange, confirmed.

    One connection, opened with ``tune`` (shorter timeouts); every broker call is bounded by
    ``timeout``. Use as a context manager.
    """

    def __init__(
        self, settings: Settings, *, tune: Tune | None = None, timeout: float | None = None
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self._connection = Connection(settings, name="oioioi-deadletter-replay", tune=tune)
        try:
            with (
                self._connection.doing("checking the results exchange"),
                self._connection.within(timeout),
            ):
                probe = self._connection.channel()
                exchange_must_exist(probe, settings.exchange, "the results exchange")
                self._channel = self._connection.channel()
                self._channel.confirm()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Republisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_usable(self) -> bool:
        return self._channel.is_open

    def replay(self, body: bytes, properties: dict[str, Any]) -> None:
        """Publish one copy (see :func:`replay_properties`) and wait for the broker's confirm.

        Raises :class:`PublishError` when the broker refuses it (unroutable, nacked: the
        connection stays usable), :class:`ConnectionClosed` when the connection is lost or the
        confirm does not come within ``timeout``.
        """
        with self._connection.doing("replaying"), self._connection.within(self.timeout):
            self._channel.publish(
                self.settings.exchange,
                self.settings.routing_key,
                body,
                replay_properties(properties_from_dict(properties)),
            )

    def close(self) -> None:
        self._connection.close()


def queue_depth(
    settings: Settings, *, tune: Tune | None = None, timeout: float | None = None
) -> int:
    """How many dead letters wait in the queue (ready ones), asked with bounded calls."""
    connection = Connection(settings, name="oioioi-deadletters", tune=tune)
    try:
        with connection.doing("counting the dead-letter queue"), connection.within(timeout):
            channel = connection.channel()
            state = queue_must_exist(channel, settings.dead_letter_queue, "the dead-letter queue")
            return state.messages
    finally:
        connection.close()
