"""``manage.py results_status``: the state of the results path at a glance, for an operator.

Queue depths and consumers attached (from the broker), dead letters by reason (read without taking
them), jobs in each state, the oldest WAITING job and pending runs (from the database). A broker
that cannot be reached is reported as such, the rest is shown anyway, and the exit code is 1.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError
from django.db.models import Count, Max, Min
from django.utils import timezone

from consumer.config import Settings
from consumer.errors import ConsumerError
from consumer.redact import redact_text, redact_url
from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.claims import MAX_ATTEMPTS, RELAY_PREFIX
from oioioi.workers.conf import command_settings
from oioioi.workers.logging import route_library_logs
from oioioi.workers.models import PendingRun
from oioioi.workers.status import BrokerStatus, broker_status
from results_dead_letters import passes

log = logging.getLogger(__name__)

#: Most dead letters looked at to count reasons; beyond this the counts say "at least".
BROWSE_LIMIT = 10_000


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
        route_library_logs()
        # What fails is reported in the output; pika's own account of it (a traceback per failed
        # connection, a warning per missing queue) would only bury that on the terminal.
        for name in ("pika", "oioioi.workers.status"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        settings = command_settings()
        broker = broker_status(settings)
        status = {
            "broker": _broker(settings, broker),
            "dead_letters": (
                _dead_letters(settings, BROWSE_LIMIT)
                if not options["no_browse"] and broker.reachable
                else {"browsed": False}
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


def _broker(settings: Settings, found: BrokerStatus) -> dict[str, Any]:
    return {
        "url": redact_url(settings.amqp_url),
        "reachable": found.reachable,
        "error": redact_text(found.error) if found.error else None,
        "queues": [
            {"role": q.role, "name": q.name, "messages": q.messages, "consumers": q.consumers}
            for q in found.queues
        ],
    }


def _dead_letters(settings: Settings, limit: int) -> dict[str, Any]:
    """Dead letters by reason, read with :func:`results_dead_letters.passes.browse`.

    Browsing leaves the queue as it was: every message read is put back (a quorum queue's as a
    confirmed copy at its tail, so that reading never counts against a delivery limit).
    """
    try:
        letters = passes.browse(settings, limit=limit)
    except (ConsumerError, OSError) as e:
        return {"browsed": False, "error": redact_text(f"{type(e).__name__}: {e}")[:300]}
    reasons = Counter(letter.reason for letter in letters)
    ages = [age for letter in letters if (age := letter.age_seconds()) is not None]
    return {
        "browsed": True,
        "count": len(letters),
        "complete": len(letters) < limit,
        "by_reason": dict(reasons.most_common()),
        "oldest_age_seconds": round(max(ages)) if ages else None,
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
        stuck = PendingRun.objects.filter(attempts__gte=MAX_ATTEMPTS).count()
        in_celery = PendingRun.objects.filter(
            claimed_by__startswith=RELAY_PREFIX, claimed_until__gte=now
        ).count()
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
            "in_celery": in_celery,
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
        out.append(f"  could not be read: {dead['error']}")
    elif not dead["browsed"]:
        out.append("  (not read)")
    elif not dead["by_reason"]:
        out.append("  none")
    else:
        for reason, n in dead["by_reason"].items():
            out.append(f"  {reason:<20}{n:>8}")
        if not dead["complete"]:
            out.append(f"  (only the first {dead['count']} were read)")
        if dead.get("oldest_age_seconds") is not None:
            out.append(f"  oldest failed {_duration(dead['oldest_age_seconds'])} ago")
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
            f"  {runs['count']} pending ({runs['in_celery']} handed to Celery), "
            f"{runs['given_up']} given up after "
            f"{MAX_ATTEMPTS} attempts"
            + (f", oldest since {runs['oldest']:%Y-%m-%d %H:%M:%S %Z}" if runs["oldest"] else "")
        )
    return "\n".join(out) + "\n"


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
