"""``manage.py results_status``: the state of the results path at a glance, for an operator.

Queue depths and consumers attached (from the broker), dead letters by reason (read without taking
them), jobs in each state, the oldest WAITING job and pending runs (from the database). A broker
that cannot be reached is reported as such, the rest is shown anyway, and the exit code is 1.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime
from typing import Any

import pika
import pika.exceptions
from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError
from django.db.models import Count, Max, Min
from django.utils import timezone

from consumer.config import Settings
from consumer.policy import REASON
from consumer.redact import redact_text, redact_url
from consumer.transport import connection_parameters
from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.conf import consumer_settings
from oioioi.workers.models import PendingRun
from oioioi.workers.status import broker_status

log = logging.getLogger(__name__)

#: Most dead letters looked at to count reasons; beyond this the counts say "at least".
BROWSE_LIMIT = 10_000

#: Seconds to wait for the broker before reporting it unreachable.
TIMEOUT = 3.0

#: Attempts after which a pending run is left alone (see the README's "Stranded jobs").
RUN_ATTEMPTS_LIMIT = 5


class Command(BaseCommand):
    help = (
        "Show queue depths, consumers attached, dead letters by reason, jobs in each state, the "
        "oldest WAITING job and pending runs. Exit code 1 when the broker or the database could "
        "not be reached (what could be read is shown all the same)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument(
            "--no-browse",
            action="store_true",
            help="Do not read the dead-letter queue to count reasons (only its depth is shown).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings = consumer_settings()
        status = {
            "broker": _broker(settings),
            "dead_letters": (
                {"browsed": False}
                if options["no_browse"]
                else _dead_letters(settings, BROWSE_LIMIT)
            ),
            **_database(),
        }
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2, default=str))
        else:
            self.stdout.write(_table(status))
        if not status["broker"]["reachable"] or "error" in status["jobs"]:
            raise SystemExit(1)


# --- gathering ---------------------------------------------------------------------------------


def _broker(settings: Settings) -> dict[str, Any]:
    found = broker_status(settings)
    return {
        "url": redact_url(settings.amqp_url),
        "reachable": found.reachable,
        "error": redact_text(found.error) if found.error else None,
        "queues": [
            {"role": q.role, "name": q.name, "messages": q.messages, "consumers": q.consumers}
            for q in found.queues
        ],
    }


def _parameters(settings: Settings) -> pika.URLParameters:
    params = connection_parameters(settings)
    params.connection_attempts = 1
    params.socket_timeout = TIMEOUT
    params.stack_timeout = TIMEOUT * 2
    params.client_properties = {"connection_name": "oioioi-results-status"}
    return params


def _dead_letters(settings: Settings, limit: int) -> dict[str, Any]:
    """Reasons of the dead letters, read without acknowledging: closing the channel returns them.

    Each one read counts as a delivery of the dead-letter queue (it has no delivery limit, so
    nothing moves), and while it is read no other client can take it.
    """
    reasons: Counter[str] = Counter()
    oldest: float | None = None
    try:
        connection = pika.BlockingConnection(_parameters(settings))
    except (pika.exceptions.AMQPError, OSError) as e:
        return {"browsed": False, "error": redact_text(f"{type(e).__name__}: {e}")[:300]}
    try:
        channel = connection.channel()
        depth = channel.queue_declare(settings.dead_letter_queue, passive=True).method.message_count
        for _ in range(min(depth, limit)):
            method, props, _body = channel.basic_get(settings.dead_letter_queue, auto_ack=False)
            if method is None:
                break
            headers = props.headers or {}
            reason = headers.get(REASON)
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            if reason is None and "x-death" in headers:
                reason = "delivery-limit"  # dead-lettered by the broker, not by a consumer
            reasons[str(reason or "unknown")] += 1
            if props.timestamp and (oldest is None or props.timestamp < oldest):
                oldest = props.timestamp
        channel.close()  # everything read goes back, in order
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != 404:
            return {"browsed": False, "error": redact_text(f"{type(e).__name__}: {e}")[:300]}
        return {"browsed": True, "count": 0, "complete": True, "by_reason": {}}
    except (pika.exceptions.AMQPError, OSError) as e:
        return {"browsed": False, "error": redact_text(f"{type(e).__name__}: {e}")[:300]}
    finally:
        try:
            if connection.is_open:
                connection.close()
        except (pika.exceptions.AMQPError, OSError):
            log.debug("Error while closing the status connection.", exc_info=True)
    counted = sum(reasons.values())
    return {
        "browsed": True,
        "count": counted,
        "complete": counted < limit,
        "by_reason": dict(reasons.most_common()),
        "oldest_published": (
            datetime.fromtimestamp(oldest, timezone.get_current_timezone()) if oldest else None
        ),
    }


def _database() -> dict[str, Any]:
    try:
        now = timezone.now()
        by_state = dict(
            QueuedJob.objects.values_list("state").annotate(n=Count("pk")).order_by("state")
        )
        oldest = QueuedJob.objects.filter(state="WAITING").order_by("creation_date").first()
        runs = PendingRun.objects.aggregate(
            count=Count("pk"), oldest=Min("created_at"), most_attempts=Max("attempts")
        )
        stuck = PendingRun.objects.filter(attempts__gte=RUN_ATTEMPTS_LIMIT).count()
    except DatabaseError as e:
        error = redact_text(f"{type(e).__name__}: {e}")[:300]
        return {"jobs": {"error": error}, "pending_runs": {"error": error}}
    return {
        "jobs": {
            "by_state": by_state,
            "oldest_waiting": (
                {
                    "job_id": oldest.job_id,
                    "submission_id": oldest.submission_id,
                    "since": oldest.creation_date,
                    "age_seconds": round((now - oldest.creation_date).total_seconds()),
                }
                if oldest
                else None
            ),
        },
        "pending_runs": {
            "count": runs["count"],
            "oldest": runs["oldest"],
            "most_attempts": runs["most_attempts"] or 0,
            "given_up": stuck,
        },
    }


# --- the human table ---------------------------------------------------------------------------


def _table(status: dict[str, Any]) -> str:
    out: list[str] = []
    broker = status["broker"]
    out.append(f"Broker {broker['url']}")
    if not broker["reachable"]:
        out.append(f"  unreachable: {broker['error']}")
    else:
        out.append(f"  {'queue':<14}{'name':<44}{'messages':>10}{'consumers':>11}")
        for q in broker["queues"]:
            if q["messages"] is None:
                out.append(f"  {q['role']:<14}{q['name']:<44}{'(does not exist)':>21}")
            else:
                out.append(
                    f"  {q['role']:<14}{q['name']:<44}{q['messages']:>10}{q['consumers']:>11}"
                )
    dead = status["dead_letters"]
    out.append("")
    out.append("Dead letters by reason")
    if dead.get("error"):
        out.append(f"  unreachable: {dead['error']}")
    elif not dead["browsed"]:
        out.append("  (not read: --no-browse)")
    elif not dead["by_reason"]:
        out.append("  none")
    else:
        for reason, n in dead["by_reason"].items():
            out.append(f"  {reason:<20}{n:>8}")
        if not dead["complete"]:
            out.append(f"  (only the first {dead['count']} were read)")
        if dead.get("oldest_published"):
            out.append(f"  oldest published {dead['oldest_published']:%Y-%m-%d %H:%M:%S %Z}")
    out.append("")
    jobs = status["jobs"]
    out.append("Jobs by state")
    if "error" in jobs:
        out.append(f"  database unreachable: {jobs['error']}")
    else:
        if not jobs["by_state"]:
            out.append("  none")
        for state, n in jobs["by_state"].items():
            out.append(f"  {state:<20}{n:>8}")
        oldest = jobs["oldest_waiting"]
        if oldest:
            out.append(
                f"  oldest WAITING: {oldest['job_id']} (submission {oldest['submission_id']}), "
                f"waiting {_duration(oldest['age_seconds'])}"
            )
        runs = status["pending_runs"]
        out.append("")
        out.append("Pending runs")
        out.append(
            f"  {runs['count']} pending, {runs['given_up']} given up after "
            f"{RUN_ATTEMPTS_LIMIT} attempts"
            + (f", oldest since {runs['oldest']:%Y-%m-%d %H:%M:%S %Z}" if runs["oldest"] else "")
        )
    return "\n".join(out) + "\n"


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
