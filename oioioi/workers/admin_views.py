"""Pieces of the operator pages that talk to the broker: the status page, how many dead letters
still wait in the broker's queue, and what to tell the operator when the broker fails.

Every broker call here is bounded by the status panel's short timeouts
(:func:`oioioi.workers.status.tune_short`), and a failure becomes one plain sentence of its kind
(:mod:`results_dead_letters.diagnose`), never an error page or a Python repr.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse

from consumer.errors import ConsumerError
from oioioi.workers.admin_site import admin_url
from oioioi.workers.conf import consumer_settings, setting
from oioioi.workers.deadletters import BROKER_CALL_TIMEOUT
from oioioi.workers.models import DeadLetter
from oioioi.workers.permissions import REPLAY_PERMISSION, VIEW_PERMISSION
from oioioi.workers.status import tune_short
from results_dead_letters import archiving, diagnose

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

log = logging.getLogger(__name__)

#: A malformed broker setting (``AMQP_URL``...): the page says so instead of failing.
SETTINGS_ERRORS: tuple[type[BaseException], ...] = (ImproperlyConfigured, ValueError)

#: Errors of a broker call: shown as a notice, never an error page.
BROKER_ERRORS: tuple[type[BaseException], ...] = (ConsumerError, OSError, *SETTINGS_ERRORS)


def _require(request: HttpRequest, permission: str) -> None:
    if not request.user.has_perm(permission):
        raise PermissionDenied


def broker_error(request: HttpRequest, error: BaseException) -> str:
    """What to tell the operator about a failed broker call (the log gets its kind only)."""
    if isinstance(error, SETTINGS_ERRORS):
        failure = diagnose.describe_failure(error, kind=diagnose.SETTINGS)
        failure = diagnose.BrokerFailure(failure.kind, failure.sentence, str(error)[:300])
    else:
        failure = diagnose.describe_failure(error)
    log.warning(
        "Operator page: a broker call failed (%s).",
        failure.kind,
        extra={"user": request.user.get_username()},
    )
    return str(failure)


def broker_backlog(request: HttpRequest) -> dict[str, Any]:
    """For the dead-letter list: how many wait in the broker's queue to be archived (one bounded
    call), or why the broker could not say."""
    try:
        waiting = archiving.queue_depth(
            consumer_settings(), tune=tune_short, timeout=BROKER_CALL_TIMEOUT
        )
    except BROKER_ERRORS as e:
        return {"broker_error": broker_error(request, e), "broker_waiting": None}
    return {"broker_error": "", "broker_waiting": waiting}


def _context(model_admin: ModelAdmin[Any], request: HttpRequest, title: str) -> dict[str, Any]:
    return {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "app_label": model_admin.opts.app_label,
        "title": title,
        "can_replay": request.user.has_perm(REPLAY_PERMISSION),
        "list_url": admin_url("workers_deadletter_changelist"),
        "status_url": admin_url("workers_deadletterqueue_status"),
        "queue_name": setting("RESULTS_DEAD_LETTER_QUEUE"),
    }


def status_page(model_admin: ModelAdmin[Any], request: HttpRequest) -> HttpResponse:
    """The status panel on a page of its own (OIOIOI's admin index is not ours to change)."""
    _require(request, VIEW_PERMISSION)
    context = _context(model_admin, request, "Return path")
    return TemplateResponse(request, "workers/admin/status.html", context)


def to_archive(model_admin: ModelAdmin[Any], request: HttpRequest, path: str) -> HttpResponse:
    """The dead-letter pages' former addresses lead to the archive's pages."""
    _require(request, VIEW_PERMISSION)
    if path:
        row = DeadLetter.objects.unsettled().filter(letter_id=path.rstrip("/")).only("pk").first()
        if row is not None:
            return HttpResponseRedirect(admin_url("workers_deadletter_change", row.pk))
    query = request.GET.urlencode()
    return HttpResponseRedirect(
        admin_url("workers_deadletter_changelist") + (f"?{query}" if query else "")
    )
