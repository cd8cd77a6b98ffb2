"""The library's exceptions; pika's never leave :mod:`consumer.transport`."""

from __future__ import annotations


class ConsumerError(Exception):
    """Root of every error this library raises."""


# --- Message-specific, permanent: the message goes to the dead-letter queue at once. -----------


class PermanentError(ConsumerError):
    """Raised when a message can never succeed, however often it is retried."""

    #: Short reason code put in the dead-letter headers and used in metrics.
    reason = "permanent"


class UndecodableMessage(PermanentError):
    """Raised when a body is not UTF-8 JSON."""

    reason = "undecodable"


class InvalidEnviron(PermanentError):
    """Raised when the JSON is not an environ a worker returns (legacy receiver's rules)."""

    reason = "invalid"


class RejectedEnviron(PermanentError):
    """Raised by the write when the domain refuses the environ (no job id, bad saved environ id)."""

    reason = "rejected"


class NoSavedEnviron(RejectedEnviron):
    """Raised when a result names no ``saved_environ_id``: it resumes no job (a worker's result
    always answers a transfer, which saved the job's environ)."""

    reason = "no-saved-environ"


class MismatchedEnviron(RejectedEnviron):
    """Raised by the write when a result's ``saved_environ_id`` names the saved environ of
    another job than its ``job_id``: both jobs are left as they were."""

    reason = "mismatch"


class DeliveryLimitExceeded(PermanentError):
    """Raised when a message was in hand each time its consumer died, too often (classic queues)."""

    reason = "delivery-limit"


# --- Infrastructure: not the message's fault; nothing is dead-lettered for these. --------------


class TransportError(ConsumerError):
    """Raised when the broker connection or channel is gone; the caller reconnects."""


class ConnectionClosed(TransportError):
    """Raised when the connection to the broker was lost or could not be made."""

    #: pika's errors behind it, one per broker node tried (empty when not known).
    causes: tuple[BaseException, ...] = ()


class ConsumerCancelled(TransportError):
    """Raised when the broker cancelled our consumer (queue deleted, node failover)."""


class StaleDelivery(TransportError):
    """Raised on an attempt to settle a delivery that arrived on an earlier channel."""


class PublishError(ConsumerError):
    """Raised when the broker did not confirm a publish (nacked, unroutable, or gone)."""


class ConfirmTimeout(PublishError):
    """Raised when the broker did not confirm a publish in time (a queue without a majority of its
    nodes, a node that stopped answering); the connection it was sent on has been cut."""


class DatabaseUnavailable(ConsumerError):
    """Raised when a write kept failing with transient database errors past its retry budget."""


class WriteKeepsFailing(ConsumerError):
    """Raised when a write keeps failing with transient errors although the database answers."""


class ShuttingDown(ConsumerError):
    """Raised inside the consume loop when shutdown was asked for while a message was held."""


class BrokerRefused(ConsumerError):
    """Raised when the broker closed the channel on a call (no permission, no such queue, a queue
    declared with other arguments); the connection stands. Carries the broker's reply."""

    #: The broker's reply code (403: access refused, 404: not found, 406: precondition failed).
    reply_code: int | None = None
    reply_text: str = ""
