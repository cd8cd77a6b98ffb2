"""Template tags of the operator pages: the status panel of the admin index."""

from __future__ import annotations

from typing import Any

from django import template
from django.urls import reverse
from django.utils import timezone

from oioioi.workers import admin_helpers, status
from oioioi.workers.conf import consumer_settings
from oioioi.workers.permissions import VIEW_PERMISSION

register = template.Library()


@register.inclusion_tag("workers/admin/status_panel.html", takes_context=True)
def workers_status_panel(context: template.Context) -> dict[str, Any]:
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.has_perm(VIEW_PERMISSION):
        return {"show": False}
    now = timezone.now()
    broker = status.broker_status(consumer_settings())
    jobs = status.jobs_status(now)
    oldest = jobs.oldest_waiting
    jobs_url = reverse("admin:evalmgr_queuedjob_changelist")
    return {
        "show": True,
        "broker": broker,
        "results": broker.queue("results"),
        "retry": broker.queue("retry"),
        "dead": broker.queue("dead letters"),
        "jobs": jobs,
        "oldest": oldest,
        "oldest_age": (now - oldest.creation_date) if oldest else None,
        "stale_after": status.stale_threshold(),
        "jobs_url": jobs_url,
        "stale_url": f"{jobs_url}?attention=stale",
        "waiting_url": f"{jobs_url}?state__exact=WAITING",
        "dead_letters_url": reverse("admin:workers_deadletterqueue_changelist"),
    }


@register.filter
def duration(value: Any) -> str:
    """A timedelta (or seconds) as a short, readable age."""
    return admin_helpers.duration(value)
