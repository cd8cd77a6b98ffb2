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
    """No table: the dead-letter queue lives in the broker. This model carries the permissions
    of the operator pages and gives the queue its place in the Django admin."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("view_deadletters", "Can see the dead-letter queue and the return path's status"),
            ("replay_deadletters", "Can replay or discard dead-lettered messages"),
        ]
        verbose_name = "dead letter"
        verbose_name_plural = "dead letters"
