"""The dead-letter pages of the admin: list, one message, and replay or discard after a confirmation;
and the page of the status panel.

Reading never consumes: the list and the detail use :func:`consumer.deadletters.browse` and
:func:`~consumer.deadletters.get`, which leave the queue as it was. Replay and discard change the
queue, so they need their own permission, a POST with its CSRF token, and a confirmation page that
shows what is about to happen. A message whose replay fails stays in the dead-letter queue, and the
notice says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.contrib import messages
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from consumer import deadletters
from consumer.errors import ConnectionClosed, ConsumerError
from consumer.redact import redact_text
from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.admin_helpers import duration, pretty_json
from oioioi.workers.admin_site import admin_url
from oioioi.workers.conf import consumer_settings, setting
from oioioi.workers.permissions import REPLAY_PERMISSION, VIEW_PERMISSION

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

log = logging.getLogger(__name__)

#: Most messages the list reads from the broker at once (reading is not free: each is fetched).
LIST_LIMIT = 200

#: Longest body the detail page shows; the rest is cut with a note.
BODY_DISPLAY_LIMIT = 256 * 1024

#: Errors of a broker call: shown as a notice, never an error page. The dead-letter tools wrap
#: pika's errors in ours, except (so far) the connector error of a handshake that timed out.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    ConsumerError,
    AMQPConnectorException,
    OSError,
    ImproperlyConfigured,  # a malformed AMQP_URL: the page says so instead of failing
)

ACTIONS = {
    "replay": "Replay",
    "discard": "Discard",
}


@dataclass(frozen=True)
class Row:
    """A dead letter as the list shows it."""

    letter: deadletters.DeadLetter
    age: str
    job_exists: bool


def _require(request: HttpRequest, permission: str) -> None:
    if not request.user.has_perm(permission):
        raise PermissionDenied


def _context(model_admin: ModelAdmin[Any], request: HttpRequest, title: str) -> dict[str, Any]:
    return {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "app_label": model_admin.opts.app_label,
        "title": title,
        "can_replay": request.user.has_perm(REPLAY_PERMISSION),
        "list_url": admin_url("workers_deadletterqueue_changelist"),
        "confirm_url": admin_url("workers_deadletterqueue_confirm"),
        "status_url": admin_url("workers_deadletterqueue_status"),
        "queue_name": setting("RESULTS_DEAD_LETTER_QUEUE"),
    }


def _rows(letters: list[deadletters.DeadLetter]) -> list[Row]:
    now = time.time()
    job_ids = {letter.job_id for letter in letters if letter.job_id}
    existing = set(QueuedJob.objects.filter(job_id__in=job_ids).values_list("job_id", flat=True))
    return [
        Row(
            letter=letter,
            age=duration(letter.age_seconds(now)),
            job_exists=letter.job_id in existing,
        )
        for letter in letters
    ]


def _broker_error(request: HttpRequest, error: BaseException) -> str:
    """What to tell the operator about a failed broker call (the log gets the class only)."""
    log.warning(
        "Dead-letter page: the broker call failed (%s).",
        type(error).__name__,
        extra={"user": request.user.get_username()},
    )
    if isinstance(error, ImproperlyConfigured):
        return f"The broker settings are not valid: {error}."
    if isinstance(error, deadletters.TopologyMissing):
        return f"{error}. Nothing has been dead-lettered there yet, or the queue names differ."
    if isinstance(error, ConnectionClosed | AMQPConnectorException | OSError):
        return f"The broker is unreachable ({redact_text(str(error))[:300]})."
    return f"The broker refused the operation ({redact_text(str(error))[:300]})."


def _header_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(deadletters.jsonable(value), ensure_ascii=False)


def status_page(model_admin: ModelAdmin[Any], request: HttpRequest) -> HttpResponse:
    """The status panel on a page of its own (OIOIOI's admin index is not ours to change)."""
    _require(request, VIEW_PERMISSION)
    context = _context(model_admin, request, "Return path")
    return TemplateResponse(request, "workers/admin/status.html", context)


def dead_letter_list(model_admin: ModelAdmin[Any], request: HttpRequest) -> HttpResponse:
    _require(request, VIEW_PERMISSION)
    context = _context(model_admin, request, "Dead letters")
    reason = request.GET.get("reason", "")
    try:
        letters = deadletters.browse(consumer_settings(), limit=LIST_LIMIT)
    except BROKER_ERRORS as e:
        context.update(broker_error=_broker_error(request, e), rows=[], reasons=[])
        return TemplateResponse(request, "workers/admin/deadletter_list.html", context)
    reasons = sorted(Counter(letter.reason for letter in letters).items())
    shown = [letter for letter in letters if not reason or letter.reason == reason]
    context.update(
        rows=_rows(shown),
        total=len(letters),
        truncated=len(letters) >= LIST_LIMIT,
        limit=LIST_LIMIT,
        reasons=reasons,
        reason=reason,
    )
    return TemplateResponse(request, "workers/admin/deadletter_list.html", context)


def dead_letter_detail(
    model_admin: ModelAdmin[Any], request: HttpRequest, dead_letter_id: str
) -> HttpResponse:
    _require(request, VIEW_PERMISSION)
    context = _context(model_admin, request, f"Dead letter {dead_letter_id}")
    try:
        letter = deadletters.get(consumer_settings(), dead_letter_id)
    except BROKER_ERRORS as e:
        context.update(broker_error=_broker_error(request, e), letter=None)
        return TemplateResponse(request, "workers/admin/deadletter_detail.html", context)
    if letter is None:
        messages.warning(
            request,
            f"Dead letter {dead_letter_id} is not in the dead-letter queue "
            "(replayed or discarded meanwhile?).",
        )
        return HttpResponseRedirect(context["list_url"])
    body = letter.body[:BODY_DISPLAY_LIMIT]
    [row] = _rows([letter])
    context.update(
        letter=letter,
        row=row,
        headers=[(name, _header_text(value)) for name, value in sorted(letter.headers.items())],
        body=pretty_json(body),
        body_cut=len(letter.body) > BODY_DISPLAY_LIMIT,
        body_limit=BODY_DISPLAY_LIMIT,
    )
    return TemplateResponse(request, "workers/admin/deadletter_detail.html", context)


def dead_letter_action(model_admin: ModelAdmin[Any], request: HttpRequest) -> HttpResponse:
    """Replay or discard: first a confirmation page, then (``confirmed``) the action itself."""
    _require(request, VIEW_PERMISSION)
    _require(request, REPLAY_PERMISSION)
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    list_url = admin_url("workers_deadletterqueue_changelist")
    action = request.POST.get("action", "")
    ids = [i for i in request.POST.getlist("ids") if i]
    if action not in ACTIONS:
        messages.error(request, "Unknown action.")
        return HttpResponseRedirect(list_url)
    if not ids:
        messages.warning(request, "No dead letter was selected: nothing was done.")
        return HttpResponseRedirect(list_url)
    if request.POST.get("confirmed") != "yes":
        return _confirmation(model_admin, request, action, ids)
    user = request.user.get_username()
    try:
        settings = consumer_settings()
        if action == "replay":
            report = deadletters.replay(settings, ids)
            _report_replay(request, report, len(ids))
            log.info(
                "Operator %r replayed dead letters: %d replayed, %d skipped, %d failed.",
                user,
                report.replayed,
                report.skipped,
                report.failed,
            )
        else:
            discarded = deadletters.discard(settings, ids)
            _report_discard(request, discarded, len(ids))
            log.info("Operator %r discarded %d of %d dead letter(s).", user, discarded, len(ids))
    except BROKER_ERRORS as e:
        messages.error(
            request,
            f"Nothing was {'replayed' if action == 'replay' else 'discarded'}: every selected "
            f"message is still in the dead-letter queue. {_broker_error(request, e)}",
        )
    return HttpResponseRedirect(list_url)


def _confirmation(
    model_admin: ModelAdmin[Any], request: HttpRequest, action: str, ids: list[str]
) -> HttpResponse:
    context = _context(model_admin, request, f"{ACTIONS[action]} dead letters: are you sure?")
    try:
        settings = consumer_settings()
        found = [letter for i in ids if (letter := deadletters.get(settings, i)) is not None]
    except BROKER_ERRORS as e:
        context.update(broker_error=_broker_error(request, e), rows=[])
        return TemplateResponse(request, "workers/admin/deadletter_confirm.html", context)
    context.update(
        action=action,
        action_label=ACTIONS[action],
        rows=_rows(found),
        ids=ids,
        missing=len(ids) - len(found),
    )
    return TemplateResponse(request, "workers/admin/deadletter_confirm.html", context)


def _plural(count: int, word: str = "message") -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _report_replay(request: HttpRequest, report: deadletters.ReplayReport, selected: int) -> None:
    if report.replayed:
        messages.success(
            request,
            f"Replayed {_plural(report.replayed)}: back in the results queue and removed from "
            "the dead-letter queue. The consumer applies them as usual (a result already "
            "applied is recognised and ignored).",
        )
    missing = len(report.not_found)
    if missing:
        messages.warning(
            request,
            f"{_plural(missing)} of {selected} selected {'was' if missing == 1 else 'were'} no "
            "longer in the dead-letter queue (replayed or discarded meanwhile): nothing done for "
            f"{'it' if missing == 1 else 'them'}.",
        )
    if report.failed:
        why = "; ".join(sorted({redact_text(reason) for _, reason in report.failures}))[:500]
        messages.error(
            request,
            f"{_plural(report.failed)} could not be replayed and "
            f"{'stays' if report.failed == 1 else 'stay'} in the dead-letter queue: nothing was "
            f"lost. The broker said: {why}",
        )
    if not (report.replayed or missing or report.failed):
        messages.warning(request, "Nothing was replayed.")


def _report_discard(request: HttpRequest, discarded: int, selected: int) -> None:
    if discarded:
        messages.success(
            request, f"Discarded {_plural(discarded)}: removed from the dead-letter queue for good."
        )
    if discarded < selected:
        messages.warning(
            request,
            f"{_plural(selected - discarded)} of {selected} selected "
            "{} no longer in the dead-letter queue: nothing done for {}.".format(
                "was" if selected - discarded == 1 else "were",
                "it" if selected - discarded == 1 else "them",
            ),
        )
