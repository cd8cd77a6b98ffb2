"""Template tags of the operator pages: the status panel, and URLs in the admin site's namespace."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django import template
from django.contrib.admin.utils import quote
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from oioioi.workers import admin_helpers, status
from oioioi.workers.admin_site import admin_url as site_admin_url
from oioioi.workers.conf import consumer_settings
from oioioi.workers.models import DeadLetter
from oioioi.workers.permissions import VIEW_PERMISSION

register = template.Library()


@register.simple_tag
def admin_url(name: str, *args: Any, **kwargs: Any) -> str:
    """``{% admin_url "workers_deadletter_change" row.pk %}``: a page of the site the
    operator pages are on, whichever it is (``{% url 'admin:...' %}`` names Django's default)."""
    return site_admin_url(name, *args, **kwargs)


def stale_jobs_query(now: datetime) -> str:
    """The queued-job list's query for the jobs needing attention now. Plain field lookups, which
    any queued-job page takes (OIOIOI's has no filter of ours)."""
    return urlencode(
        {
            "state__in": ",".join(status.WAITING_STATES),
            "creation_date__lt": status.stale_cutoff(now).isoformat(),
        }
    )


@register.inclusion_tag("workers/admin/status_panel.html", takes_context=True)
def workers_status_panel(context: template.Context) -> dict[str, Any]:
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.has_perm(VIEW_PERMISSION):
        return {"show": False}
    now = timezone.now()
    try:
        broker = status.broker_status(consumer_settings())
    except ImproperlyConfigured as e:
        broker = status.BrokerStatus(error=f"the broker settings are not valid: {e}")
    jobs = status.jobs_status(now)
    oldest = jobs.oldest_waiting
    dead = broker.queue("dead letters")
    archived = DeadLetter.objects.unsettled().count()
    waiting = dead.messages if dead is not None and dead.messages is not None else 0
    jobs_url = site_admin_url("evalmgr_queuedjob_changelist")
    return {
        "show": True,
        "broker": broker,
        "results": broker.queue("results"),
        "retry": broker.queue("retry"),
        "dead": dead,
        "dead_archived": archived,
        "dead_waiting": waiting,
        "dead_total": archived + waiting,
        "jobs": jobs,
        "oldest": oldest,
        "oldest_age": (now - oldest.creation_date) if oldest else None,
        "oldest_url": (
            site_admin_url("evalmgr_queuedjob_change", quote(oldest.pk)) if oldest else None
        ),
        "stale_after": status.stale_threshold(),
        "stale_url": f"{jobs_url}?{stale_jobs_query(now)}",
        "waiting_url": f"{jobs_url}?state__exact=WAITING",
        "dead_letters_url": site_admin_url("workers_deadletter_changelist"),
    }


@register.filter
def duration(value: Any) -> str:
    """A timedelta (or seconds) as a short, readable age."""
    return admin_helpers.duration(value)
