"""The dead-letter pages: an ordinary changelist of the archived dead letters, one message, and
replay or discard of a selection (any size: Django's *select all N* included) after a confirmation.

Listing, searching, filtering and viewing read the table only: the broker is asked for one number
(how many dead letters still wait in its queue to be archived), with the status panel's short
timeout. Discarding is one ``DELETE``. Replaying runs in chunks the browser asks for one after
the other, showing its progress: each chunk publishes its rows again, waits for the broker's
confirms and deletes the rows confirmed (:func:`oioioi.workers.deadletters.replay_chunk`).

A selection is fixed when it is confirmed: the filters and search of the list it was made on
(or the ids ticked) and the largest primary key it then had, so rows archived meanwhile are not
swept in.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied
from django.db.models import Exists, OuterRef, QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    JsonResponse,
    QueryDict,
)
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.html import format_html
from django.utils.safestring import SafeString

from consumer.redact import redact_text
from oioioi.evalmgr.models import QueuedJob
from oioioi.workers import admin_views
from oioioi.workers import deadletters as archive
from oioioi.workers.admin_helpers import AgeFilter, age, badge, pretty_json
from oioioi.workers.admin_jobs import job_link
from oioioi.workers.admin_site import admin_url
from oioioi.workers.conf import consumer_settings, setting
from oioioi.workers.models import DeadLetter
from oioioi.workers.permissions import REPLAY_PERMISSION, VIEW_PERMISSION

log = logging.getLogger(__name__)

#: Longest body the detail page shows; a larger one is cut there, and downloadable whole.
BODY_DISPLAY_LIMIT = 256 * 1024

#: Rows a confirmation page names (the rest are counted).
CONFIRM_SHOWN = 20


class ReasonFilter(admin.SimpleListFilter):
    """By reason, each with its count over the whole table (one ``GROUP BY``)."""

    title = "reason"
    parameter_name = "reason"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        counts = archive.reason_counts(DeadLetter.objects.all())
        return [(reason, f"{reason} ({count:,})") for reason, count in counts]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value():
            return queryset.filter(reason=self.value())
        return None


class FailedAgeFilter(AgeFilter):
    title = "failed"
    field_name = "failed_at"


class DeadLetterAdmin(admin.ModelAdmin):
    list_display = [
        "letter_column",
        "reason_column",
        "error_column",
        "failed_column",
        "job_column",
        "size_column",
        "replays_column",
    ]
    list_display_links = None
    list_filter = [ReasonFilter, FailedAgeFilter]
    search_fields = ["letter_id", "message_id", "job_id", "group_id", "submission_id__exact"]
    search_help_text = (
        "Job id, group id, message id or dead-letter id (or part of one), or the exact "
        "submission id."
    )
    list_per_page = 100
    actions = ["replay_selected", "discard_selected"]
    ordering = ["-pk"]
    change_list_template = "workers/admin/deadletter_changelist.html"

    # --- permissions: the dead-letter queue's own ---------------------------------------------

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(VIEW_PERMISSION)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(VIEW_PERMISSION)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(VIEW_PERMISSION) and request.user.has_perm(REPLAY_PERMISSION)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        # Only ours (OIOIOI's site adds a *delete selected* that asks for no permission).
        actions = super().get_actions(request)
        return {name: actions[name] for name in self.actions if name in actions}

    # --- the list ---------------------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        # Never the bodies in a list: one may be megabytes.
        return (
            super()
            .get_queryset(request)
            .filter(settled="")
            .defer("body", "properties", "traceback")
            .annotate(job_exists=Exists(QueuedJob.objects.filter(job_id=OuterRef("job_id"))))
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        reasons = archive.reason_counts(DeadLetter.objects.all())
        context = {
            **(extra_context or {}),
            **admin_views.broker_backlog(request),
            "reasons": reasons,
            "archived_total": sum(count for _, count in reasons),
            "reason": request.GET.get("reason", ""),
            "queue_name": setting("RESULTS_DEAD_LETTER_QUEUE"),
            "status_url": admin_url("workers_deadletterqueue_status"),
            "archive_url": admin_url("workers_deadletter_archive"),
            "can_replay": self.has_replay_permission(request),
        }
        return super().changelist_view(request, extra_context=context)

    @admin.display(description="dead letter", ordering="pk")
    def letter_column(self, row: DeadLetter) -> SafeString:
        url = admin_url("workers_deadletter_change", row.pk)
        shown = row.message_id or row.letter_id
        same_group = not row.group_id or row.group_id == row.message_id
        return format_html(
            '<a href="{}" title="dead letter {}">{}</a>{}',
            url,
            row.letter_id,
            _cut(shown, 36),
            ""
            if same_group
            else format_html('<br><span class="quiet">group {}</span>', _cut(row.group_id, 30)),
        )

    @admin.display(description="reason", ordering="reason")
    def reason_column(self, row: DeadLetter) -> SafeString:
        return badge(row.reason, "danger")

    @admin.display(description="error")
    def error_column(self, row: DeadLetter) -> str:
        return _cut(row.error, 80) or "—"

    @admin.display(description="failed", ordering="failed_at")
    def failed_column(self, row: DeadLetter) -> str:
        return f"{age(row.failed_at)} ago" if row.failed_at else "—"

    @admin.display(description="job", ordering="job_id")
    def job_column(self, row: DeadLetter) -> SafeString | str:
        if not row.job_id:
            return "—"
        if getattr(row, "job_exists", False):
            return job_link(row.job_id)
        return format_html('{} <span class="quiet">(no queued job)</span>', _cut(row.job_id, 28))

    @admin.display(description="size", ordering="size")
    def size_column(self, row: DeadLetter) -> str:
        return _size(row.size)

    @admin.display(description="replayed", ordering="replays")
    def replays_column(self, row: DeadLetter) -> SafeString | str:
        # A message that failed again after a replay must not look new.
        if not row.replays:
            return "—"
        text = "once" if row.replays == 1 else f"{row.replays} times"
        return badge(text, "warning", title="x-oioioi-replays: replayed before, failed again")

    # --- one dead letter --------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            path("replay/", wrap(self.replay_chunk_view), name=f"{name}_replay"),
            path("archive/", wrap(self.archive_view), name=f"{name}_archive"),
            path("<path:object_id>/body/", wrap(self.body_view), name=f"{name}_body"),
            *super().get_urls(),
        ]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        row = self._row(object_id)
        if row is None:
            messages.warning(
                request,
                f"Dead letter {object_id} is no longer waiting (replayed or discarded).",
            )
            return HttpResponseRedirect(admin_url("workers_deadletter_changelist"))
        body = bytes(row.body)
        shown = body[:BODY_DISPLAY_LIMIT]
        headers = archive.properties_of(row).get("headers") or {}
        traceback_lines = row.traceback.rstrip().splitlines()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Dead letter {row.letter_id}",
            "row": row,
            "job_exists": QueuedJob.objects.filter(job_id=row.job_id).exists()
            if row.job_id
            else False,
            "failed_age": age(row.failed_at) if row.failed_at else "",
            "raised": traceback_lines[-1] if traceback_lines else "",
            "headers": [(k, _header_text(v)) for k, v in sorted(headers.items())],
            "body": pretty_json(shown) if len(body) <= BODY_DISPLAY_LIMIT else _text(shown),
            "body_cut": len(body) > BODY_DISPLAY_LIMIT,
            "body_limit": BODY_DISPLAY_LIMIT,
            "body_url": admin_url("workers_deadletter_body", row.pk),
            "can_replay": self.has_replay_permission(request),
            "list_url": admin_url("workers_deadletter_changelist"),
        }
        return TemplateResponse(request, "workers/admin/deadletter_detail.html", context)

    def body_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The whole body, as a download."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        row = get_object_or_404(DeadLetter.objects.unsettled(), pk=_pk(object_id))
        json_body = row.content_type == "application/json" or bytes(row.body[:1]) in (b"{", b"[")
        response = HttpResponse(
            bytes(row.body),
            content_type="application/json" if json_body else "application/octet-stream",
        )
        extension = "json" if json_body else "bin"
        response["Content-Disposition"] = f'attachment; filename="dead-letter-{row.pk}.{extension}"'
        return response

    def _row(self, object_id: str) -> DeadLetter | None:
        pk = _pk(object_id)
        waiting = DeadLetter.objects.unsettled()
        found = waiting.filter(pk=pk).first() if pk is not None else None
        return found or waiting.filter(letter_id=object_id).first()

    # --- replay and discard -----------------------------------------------------------------

    @admin.action(description="Replay selected dead letters…", permissions=["replay"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        return self._act(request, queryset, "replay")

    @admin.action(description="Discard selected dead letters…", permissions=["replay"])
    def discard_selected(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> HttpResponse | None:
        return self._act(request, queryset, "discard")

    def _act(
        self, request: HttpRequest, queryset: QuerySet[Any], action: str
    ) -> HttpResponse | None:
        select_across = request.POST.get("select_across") == "1"
        ids = request.POST.getlist(ACTION_CHECKBOX_NAME)
        upto_text = request.POST.get("upto", "")
        confirmed = request.POST.get("post") == "yes" and upto_text.isdigit()
        selection = queryset.filter(pk__lte=int(upto_text)) if confirmed else queryset
        total = selection.count()
        if not total:
            messages.warning(request, "No dead letter is selected any more: nothing was done.")
            return None
        if not confirmed:
            return self._confirmation(request, selection, action, select_across, ids, total)
        user = request.user.get_username()
        if action == "discard":
            discarded = archive.discard(selection)
            log.info("Operator %r discarded %d dead letter(s).", user, discarded)
            messages.success(
                request,
                f"Discarded {_plural(discarded)}: removed for good, their results will never "
                "be applied.",
            )
            return None
        log.info("Operator %r is replaying %d dead letter(s).", user, total)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Replaying dead letters",
            "total": total,
            "chunk_url": admin_url("workers_deadletter_replay"),
            "list_url": admin_url("workers_deadletter_changelist"),
            "query": request.GET.urlencode(),
            "select_across": "1" if select_across else "0",
            "ids": ids,
            "upto": upto_text,
        }
        return TemplateResponse(request, "workers/admin/deadletter_progress.html", context)

    def _confirmation(
        self,
        request: HttpRequest,
        selection: QuerySet[Any],
        action: str,
        select_across: bool,
        ids: list[str],
        total: int,
    ) -> HttpResponse:
        upto = selection.order_by("-pk").values_list("pk", flat=True).first()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"{action.capitalize()} dead letters: are you sure?",
            "action": action,
            "action_label": action.capitalize(),
            "total": total,
            "reasons": archive.reason_counts(selection),
            "rows": list(selection.order_by("pk")[:CONFIRM_SHOWN]),
            "more": max(0, total - CONFIRM_SHOWN),
            "select_across": "1" if select_across else "0",
            "ids": ids,
            "upto": upto,
            "list_url": admin_url("workers_deadletter_changelist"),
        }
        return TemplateResponse(request, "workers/admin/deadletter_confirm.html", context)

    def _selection(self, request: HttpRequest) -> QuerySet[Any]:
        """The confirmed selection, rebuilt from what the progress page sends back."""
        data = request.POST
        upto = data.get("upto", "")
        if not upto.isdigit():
            return DeadLetter.objects.none()
        if data.get("select_across") == "1":
            # The list's own filters and search, as the operator saw them.
            listing = copy.copy(request)
            listing.GET = QueryDict(data.get("query", ""))
            listing.method = "GET"
            queryset = self.get_changelist_instance(listing).get_queryset(listing)
        else:
            pks = [int(i) for i in data.getlist("ids") if i.isdigit()]
            queryset = self.get_queryset(request).filter(pk__in=pks)
        return queryset.filter(pk__lte=int(upto))

    def replay_chunk_view(self, request: HttpRequest) -> HttpResponse:
        """One chunk of a confirmed replay: JSON with what it did and where to go on."""
        if not self.has_replay_permission(request):
            raise PermissionDenied
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        after_text = request.POST.get("after", "0")
        after = int(after_text) if after_text.isdigit() else 0
        try:
            settings = consumer_settings()
        except admin_views.SETTINGS_ERRORS as e:
            return JsonResponse({"error": admin_views.broker_error(request, e), "done": True})
        report = archive.replay_chunk(settings, self._selection(request), after)
        answer: dict[str, Any] = {
            "replayed": report.replayed,
            "failed": report.failed,
            "failures": [
                f"{letter_id}: {redact_text(why)[:200]}" for letter_id, why in report.failures
            ][:20],
            "after": report.after,
            "done": report.after is None,
        }
        if report.error is not None:
            answer["error"] = admin_views.broker_error(request, report.error)
        return JsonResponse(answer)

    def archive_view(self, request: HttpRequest) -> HttpResponse:
        """Move what waits in the broker's queue into the table now (committed, then acked)."""
        if not self.has_replay_permission(request):
            raise PermissionDenied
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        try:
            moved = archive.archive(consumer_settings(), limit=archive.ARCHIVE_STEP_LIMIT)
        except admin_views.BROKER_ERRORS as e:
            messages.error(request, f"Nothing was archived. {admin_views.broker_error(request, e)}")
        else:
            messages.success(request, f"Archived {_plural(moved, 'dead letter')} from the broker.")
        return HttpResponseRedirect(admin_url("workers_deadletter_changelist"))


def _pk(object_id: str) -> int | None:
    return int(object_id) if object_id.isdigit() else None


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _size(size: int) -> str:
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _plural(count: int, word: str = "message") -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


def _header_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
