"""What the dead-letter operations raise beyond the library's errors, and the checks that raise
it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from consumer.errors import BrokerRefused, ConsumerError
from consumer.transport import Channel, QueueState
from results_dead_letters import diagnose


class TopologyMissing(ConsumerError):
    """Raised when the dead-letter queue or the results exchange does not exist on the broker."""

    failure_kind = diagnose.MISSING


class TopologyMismatch(ConsumerError):
    """Raised when the dead-letter queue exists with other arguments (type) than configured."""


def queue_must_exist(channel: Channel, name: str, what: str) -> QueueState:
    """The state of the queue ``name``, asked with a passive declare (nothing is created: a wrong
    name must not look like an empty queue); :class:`TopologyMissing` if the broker has none,
    which closes the channel."""
    with _missing(name, what):
        return channel.queue_state(name)


def exchange_must_exist(channel: Channel, name: str, what: str) -> None:
    """As :func:`queue_must_exist`, for the exchange ``name``."""
    with _missing(name, what):
        channel.check_exchange(name)


@contextmanager
def _missing(name: str, what: str) -> Iterator[None]:
    try:
        yield
    except BrokerRefused as e:
        if e.reply_code == 404:
            raise TopologyMissing(f"{what} {name!r} does not exist on the broker") from None
        raise
