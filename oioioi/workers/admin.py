"""Operator pages of the return path: the inbox, the pending runs and the dead-letter queue.

Everything here is read-only but the dead-letter actions: the inbox and the pending runs are the
consumer's proof of what it has done, and deleting a row would undo a guarantee (a redelivery
applied twice, a committed resume never run).

Every page registers here, on the site :mod:`oioioi.workers.admin_site` chooses: OIOIOI's own
inside OIOIOI, Django's default standalone.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers import admin_views
from oioioi.workers.admin_deadletters import DeadLetterAdmin
from oioioi.workers.admin_helpers import (
    AgeFilter,
    KeptRowsMixin,
    ReadOnlyAdminMixin,
    age,
    badge,
    pre,
    pretty_json,
)
from oioioi.workers.admin_jobs import QueuedJobAdmin, SavedEnvironAdmin, job_link
from oioioi.workers.admin_site import IN_OIOIOI, add_system_menu_entries, register, site
from oioioi.workers.claims import MAX_ATTEMPTS
from oioioi.workers.models import DeadLetter, DeadLetterQueue, PendingRun, ReceivedResult
from oioioi.workers.permissions import VIEW_PERMISSION


def job_or_finished(job_id: str, exists: bool) -> SafeString | str:
    if not job_id:
        return "—"
    if exists:
        return job_link(job_id)
    return format_html('{} <span class="quiet">(finished: no queued job left)</span>', job_id)


class ReceivedAgeFilter(AgeFilter):
    title = "received"
    field_name = "received_at"


class JobExistsMixin:
    """Annotates each row with whether its job still exists: one query per page, not per row."""

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return (
            super()  # type: ignore[misc]
            .get_queryset(request)
            .annotate(job_exists=Exists(QueuedJob.objects.filter(job_id=OuterRef("job_id"))))
        )


class ReceivedResultAdmin(JobExistsMixin, KeptRowsMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    # Kept: the inbox is what makes a redelivery harmless; deleting a row would let it apply twice.
    # Message id and group id share a column (usually the same value): at 1360 px every column,
    # *received at* included, fits without scrolling.
    list_display = [
        "message_column",
        "outcome_column",
        "job_column",
        "submission_id",
        "received_at",
    ]
    list_filter = ["outcome", ReceivedAgeFilter]
    search_fields = ["key", "message_id", "group_id", "job_id", "submission_id__exact"]
    search_help_text = (
        "Message id, group id or job id (or part of one), or the exact submission id."
    )
    ordering = ["-received_at"]
    list_per_page = 100
    readonly_fields = (
        "key",
        "message_id",
        "outcome_column",
        "job_column",
        "group_id",
        "submission_id",
        "saved_environ_id",
        "received_at",
    )
    fields = readonly_fields

    @admin.display(description="message id / group id", ordering="key")
    def message_column(self, result: ReceivedResult) -> SafeString | str:
        message = result.message_id or result.key
        if not result.group_id or result.group_id == message:
            return message
        return format_html('{}<br><span class="quiet">group {}</span>', message, result.group_id)

    @admin.display(description="outcome", ordering="outcome")
    def outcome_column(self, result: ReceivedResult) -> SafeString:
        kind = "ok" if result.outcome == "resumed" else "muted"
        return badge(result.outcome, kind)

    @admin.display(description="job", ordering="job_id")
    def job_column(self, result: ReceivedResult) -> SafeString | str:
        return job_or_finished(result.job_id, bool(getattr(result, "job_exists", False)))


class ClaimFilter(admin.SimpleListFilter):
    title = "claim"
    parameter_name = "claim"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("stuck", f"Given up ({MAX_ATTEMPTS} attempts or more)"),
            ("unclaimed", "Waiting for a runner (not claimed, or its claim has expired)"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "stuck":
            return queryset.filter(attempts__gte=MAX_ATTEMPTS)
        if self.value() == "unclaimed":
            # A consumer claims its own runs as it writes them; a claim that has expired is
            # one whose runner died: the run waits for the next sweep, like an unclaimed one.
            return queryset.filter(Q(claimed_by__isnull=True) | Q(claimed_until__lt=timezone.now()))
        return None


class RunAgeFilter(AgeFilter):
    field_name = "created_at"


class PendingRunAdmin(JobExistsMixin, KeptRowsMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    # Kept: a pending run is a committed resume; deleting it would strand its job.
    list_display = [
        "id",
        "job_column",
        "attempts_column",
        "claimed_by",
        "claimed_until",
        "age_column",
    ]
    list_filter = [ClaimFilter, RunAgeFilter]
    search_fields = ["job_id"]
    ordering = ["created_at"]
    readonly_fields = (
        "job_column",
        "attempts_column",
        "claimed_by",
        "claimed_until",
        "created_at",
        "environ_pretty",
    )
    fields = readonly_fields

    @admin.display(description="job", ordering="job_id")
    def job_column(self, run: PendingRun) -> SafeString | str:
        return job_or_finished(run.job_id, bool(getattr(run, "job_exists", False)))

    @admin.display(description="attempts", ordering="attempts")
    def attempts_column(self, run: PendingRun) -> SafeString | int:
        if run.attempts >= MAX_ATTEMPTS:
            return badge(
                f"{run.attempts}: given up", "danger", title="No runner will claim it again"
            )
        return run.attempts

    @admin.display(description="age", ordering="created_at")
    def age_column(self, run: PendingRun) -> str:
        return age(run.created_at)

    @admin.display(description="environ")
    def environ_pretty(self, run: PendingRun) -> SafeString:
        return pre(pretty_json(run.environ))


class DeadLetterQueueAdmin(admin.ModelAdmin):
    """The model holding the dead-letter permissions: the status page, and the former addresses
    of the dead-letter pages (the list and each message are :class:`DeadLetterAdmin`'s now)."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(VIEW_PERMISSION)

    def get_model_perms(self, request: HttpRequest) -> dict[str, bool]:
        # Not listed on the index: the archived dead letters are, under the same name.
        return {}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        # Only these pages: the model has no table, so the usual add/change/delete pages would fail.
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.changelist_view), name=f"{name}_changelist"),
            path("status/", wrap(self.status_view), name=f"{name}_status"),
            path("<path:rest>", wrap(self.former_view), name=f"{name}_detail"),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return admin_views.to_archive(self, request, "")

    def former_view(self, request: HttpRequest, rest: str) -> HttpResponse:
        return admin_views.to_archive(self, request, rest)

    def status_view(self, request: HttpRequest) -> HttpResponse:
        return admin_views.status_page(self, request)


if not IN_OIOIOI:
    # OIOIOI has queued-job pages of its own (with rejudge and cancel): the pages link to those.
    register(QueuedJob, QueuedJobAdmin)
register(SavedEnviron, SavedEnvironAdmin)
register(ReceivedResult, ReceivedResultAdmin)
register(PendingRun, PendingRunAdmin)
register(DeadLetterQueue, DeadLetterQueueAdmin)
register(DeadLetter, DeadLetterAdmin)
if not IN_OIOIOI:
    # The index shows the status panel to operators. OIOIOI's index is not ours to replace: there
    # the panel has a page of its own in the system-admin menu.
    site.index_template = "workers/admin/index.html"
add_system_menu_entries()
