"""Tables of the return path; upstream OIOIOI's ``workers`` app has none, so nothing collides."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


def _id() -> models.BigAutoField:
    # Stated rather than left to the app's DEFAULT_AUTO_FIELD: installed into an OIOIOI, this app
    # shares upstream's ``workers`` app config, whose default is AutoField. Written as Django
    # writes the implicit one, so the migrations stay as they are.
    return models.BigAutoField(
        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
    )


class ReceivedResult(models.Model):
    """The inbox: one row per result applied, written in the same transaction as its effect.

    A redelivered message finds its key here and is acknowledged without a second effect.
    """

    id = _id()

    #: ``message_id`` of the AMQP message, or ``sha256:<hex>`` of its body when it has none.
    key = models.CharField(max_length=255, unique=True)
    message_id = models.CharField(max_length=255, blank=True, default="")
    group_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    job_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    submission_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    saved_environ_id = models.BigIntegerField(null=True, blank=True)
    #: ``resumed`` (the job went on) or ``ignored`` (already resumed, or cancelled).
    outcome = models.CharField(max_length=16)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        verbose_name = "received result"
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return f"{self.key} ({self.outcome})"


class PendingRun(models.Model):
    """A resumed environ waiting for (or being run by) the recipe runner: the durable hand-off."""

    id = _id()

    job_id = models.CharField(max_length=255, db_index=True)
    environ = models.TextField(help_text="JSON-encoded environ, checkpointed after each phase")
    created_at = models.DateTimeField(default=timezone.now)
    claimed_by = models.CharField(max_length=255, null=True, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True, db_index=True)
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name = "pending run"
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.job_id}"


class DeliveryAttempt(models.Model):
    """How often a redelivered message was in hand when its consumer died (classic queues).

    Written in a transaction of its own before the message's write, so a crash mid-write cannot
    roll it back; a quorum queue keeps this count itself (``x-delivery-count``).
    """

    id = _id()

    #: The message's inbox key (``ReceivedResult.key``).
    key = models.CharField(max_length=255, unique=True)
    attempts = models.PositiveIntegerField(default=0)
    last_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        verbose_name = "delivery attempt"

    def __str__(self) -> str:
        return f"{self.key} ({self.attempts} attempts)"


class DeadLetterQueue(models.Model):
    """No table: the dead-letter queue lives in the broker (its messages are moved into
    :class:`DeadLetter`). This model carries the permissions of the operator pages."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("view_deadletters", "Can see the dead-letter queue and the return path's status"),
            ("replay_deadletters", "Can replay or discard dead-lettered messages"),
        ]
        verbose_name = "dead letter"
        verbose_name_plural = "dead letters"


class DeadLetterQuerySet(models.QuerySet["DeadLetter"]):
    def unsettled(self) -> DeadLetterQuerySet:
        """The dead letters still waiting for an operator (not replayed, not discarded)."""
        return self.filter(settled="")


class DeadLetter(models.Model):
    """A dead letter moved out of the broker's dead-letter queue, to be seen, replayed or discarded.

    The archiver (:mod:`oioioi.workers.deadletters`) writes a row and only then acks the message;
    a replay publishes the body again, waits for the broker's confirm, and only then marks the
    row *replayed*. A settled row keeps its id and loses its body: a copy of the message the
    broker hands out again (an ack lost with its connection) is recognised and not listed again.
    The permissions are :class:`DeadLetterQueue`'s.
    """

    id = _id()

    #: The dead letter's id (``x-oioioi-dead-letter-id``, or a hash for one the broker
    #: dead-lettered): a second copy of the same dead letter is not archived twice.
    letter_id = models.CharField(max_length=255, unique=True)
    message_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    reason = models.CharField(max_length=64, db_index=True)
    error = models.TextField(blank=True, default="")
    error_class = models.CharField(max_length=255, blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    failed_at = models.DateTimeField(null=True, blank=True, db_index=True)
    delivery_count = models.IntegerField(null=True, blank=True)
    retries = models.IntegerField(null=True, blank=True)
    #: How many times an operator had replayed it before (``x-oioioi-replays``).
    replays = models.IntegerField(default=0)
    host = models.CharField(max_length=255, blank=True, default="")
    job_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    group_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    submission_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    size = models.BigIntegerField(default=0)
    content_type = models.CharField(max_length=255, blank=True, default="")
    #: The message's AMQP properties and headers, as JSON: what a replay publishes again.
    properties = models.TextField(default="{}")
    body = models.BinaryField()
    archived_at = models.DateTimeField(default=timezone.now, db_index=True)
    #: ``""`` while it waits for an operator, then ``replayed`` or ``discarded``.
    settled = models.CharField(max_length=16, blank=True, default="", db_index=True)
    settled_at = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = DeadLetterQuerySet.as_manager()

    class Meta:
        verbose_name = "dead letter"
        verbose_name_plural = "dead letters"
        ordering = ["-pk"]
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.letter_id} ({self.reason})"
