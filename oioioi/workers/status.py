"""What the operator panel shows: queue depths and consumers from the broker, waiting jobs from the
database.

The broker is asked with short timeouts and every failure becomes a line of text in the status, so
an unreachable broker costs the admin index a few seconds at most and never an error page.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone

from consumer.config import Settings
from consumer.errors import BrokerRefused, ConnectionClosed, ConsumerError
from consumer.redact import redact_text
from consumer.transport import Connection, short_timeouts
from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.conf import setting

log = logging.getLogger(__name__)

#: Seconds the panel waits for the broker (TCP connect, then the AMQP handshake) before giving up.
CONNECT_TIMEOUT = 2.0

#: Job states in which a job waits for someone else; old ones need an operator.
WAITING_STATES = ("WAITING", "QUEUED")


@dataclass(frozen=True)
class QueueStatus:
    name: str
    role: str
    #: None when the queue does not exist (nothing has declared it yet).
    messages: int | None
    consumers: int | None


@dataclass(frozen=True)
class BrokerStatus:
    queues: list[QueueStatus] = field(default_factory=list)
    #: Why the broker could not be asked; empty when it answered.
    error: str = ""

    @property
    def reachable(self) -> bool:
        return not self.error

    def queue(self, role: str) -> QueueStatus | None:
        return next((q for q in self.queues if q.role == role), None)


def _parameters_timeout() -> float:
    """Longest wait for the whole connection: TCP, AMQP handshake and login."""
    return CONNECT_TIMEOUT * 2


#: The panel's short timeouts, for every broker call of the operator pages.
tune_short = short_timeouts(CONNECT_TIMEOUT)


def broker_status(settings: Settings) -> BrokerStatus:
    """Depth and consumer count of the results, retry and dead-letter queues; never raises."""
    roles = [
        ("results", settings.queue),
        ("retry", settings.retry_queue),
        ("dead letters", settings.dead_letter_queue),
    ]
    try:
        # The first node of AMQP_URL that answers; each node gets the short timeouts.
        connection = Connection(settings, name="oioioi-admin-status", tune=tune_short)
    except ConnectionClosed as e:
        # Only host and port of each node, never the URL's credentials.
        log.warning("Operator panel: the broker is unreachable (%s).", e)
        return BrokerStatus(error=_describe(e))
    try:
        queues: list[QueueStatus] = []
        # Each call after the handshake as well: a broker that stops answering costs seconds.
        with connection.within(_parameters_timeout()):
            _ask(connection, roles, queues)
        return BrokerStatus(queues=queues)
    except ConsumerError as e:
        log.warning("Operator panel: the broker stopped answering (%s).", type(e).__name__)
        return BrokerStatus(error=_describe(e))
    finally:
        connection.close()


def _ask(connection: Connection, roles: list[tuple[str, str]], queues: list[QueueStatus]) -> None:
    for role, name in roles:
        channel = connection.channel()
        try:
            # Passive: only asks, never creates a queue with the wrong arguments.
            state = channel.queue_state(name)
        except BrokerRefused as e:
            if e.reply_code != 404:
                raise
            queues.append(QueueStatus(name, role, None, None))
            continue
        queues.append(QueueStatus(name, role, state.messages, state.consumers))
        channel.close()


#: What a call cut by its deadline says (:meth:`consumer.transport.Connection.within`).
_CUT = re.compile(r"no answer from the broker within [0-9.]+ s")


def _describe(error: BaseException) -> str:
    cut = _CUT.search(str(error))
    if cut:
        return cut.group(0)
    if isinstance(error, ConnectionClosed):
        return redact_text(str(error))[:300]
    text = redact_text(str(error).strip()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


def stale_threshold() -> timedelta:
    return timedelta(seconds=setting("EVALMGR_STALE_JOB_SECONDS"))


def stale_cutoff(now: datetime | None = None) -> datetime:
    """Jobs waiting since before this instant need an operator."""
    return (now or timezone.now()) - stale_threshold()


@dataclass(frozen=True)
class JobsStatus:
    waiting: int
    queued: int
    stale: int
    oldest_waiting: QueuedJob | None


def jobs_status(now: datetime | None = None) -> JobsStatus:
    waiting = QueuedJob.objects.filter(state="WAITING")
    return JobsStatus(
        waiting=waiting.count(),
        queued=QueuedJob.objects.filter(state="QUEUED").count(),
        stale=QueuedJob.objects.filter(
            state__in=WAITING_STATES, creation_date__lt=stale_cutoff(now)
        ).count(),
        oldest_waiting=waiting.order_by("creation_date").first(),
    )
