"""Operator pages of the evaluation manager's tables: where each job is, and which ones need someone.

The rows are the evaluation manager's own state: the pages show them and allow deleting a job (one
an operator has given up on), never editing, since a hand-edited environ or state would resume a
job into something no recipe expects. ``oioioi.workers.admin`` registers them (inside OIOIOI, only
the saved environs: OIOIOI has queued-job pages of its own, see ``admin_site``).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.admin_helpers import (
    AgeFilter,
    KeptRowsMixin,
    ReadOnlyAdminMixin,
    age,
    badge,
    duration,
    pre,
    pretty_json,
)
from oioioi.workers.admin_site import admin_url
from oioioi.workers.models import PendingRun, ReceivedResult
from oioioi.workers.status import WAITING_STATES, stale_cutoff, stale_threshold

_STATE_BADGES = {
    "WAITING": "info",
    "QUEUED": "muted",
    "PROGRESS": "ok",
    "CANCELLED": "warning",
}


def is_stale(job: QueuedJob) -> bool:
    return job.state in WAITING_STATES and job.creation_date < stale_cutoff()


def state_badge(job: QueuedJob) -> SafeString:
    if is_stale(job):
        return format_html(
            "{} {}",
            badge(job.state, _STATE_BADGES.get(job.state, "muted")),
            badge(
                "needs attention",
                "danger",
                title=f"{job.state} for more than {duration(stale_threshold())}",
            ),
        )
    return badge(job.state, _STATE_BADGES.get(job.state, "muted"))


class JobAgeFilter(AgeFilter):
    title = "age"
    field_name = "creation_date"


class NeedsAttentionFilter(admin.SimpleListFilter):
    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("stale", f"WAITING or QUEUED for more than {duration(stale_threshold())}")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "stale":
            return queryset.filter(state__in=WAITING_STATES, creation_date__lt=stale_cutoff())
        return None


def job_link(job_id: str) -> SafeString:
    url = admin_url("evalmgr_queuedjob_change", quote(job_id))
    return format_html('<a href="{}">{}</a>', url, job_id)


class QueuedJobAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["job_id", "state_column", "age_column", "submission_id", "creation_date"]
    list_filter = [NeedsAttentionFilter, "state", JobAgeFilter]
    # ``__exact`` on an integer column compares its text, so a non-numeric term matches nothing
    # instead of failing.
    search_fields = ["job_id", "submission_id__exact"]
    search_help_text = "Job id (or part of it), or the exact submission id."
    ordering = ["-creation_date"]
    list_per_page = 100
    readonly_fields = (
        "job_id",
        "state_column",
        "age_column",
        "creation_date",
        "submission_id",
        "celery_task_id",
        "saved_environ",
        "received_results",
        "pending_runs",
    )
    fields = readonly_fields

    @admin.display(description="state", ordering="state")
    def state_column(self, job: QueuedJob) -> SafeString:
        return state_badge(job)

    @admin.display(description="age", ordering="-creation_date")
    def age_column(self, job: QueuedJob) -> str:
        return age(job.creation_date)

    @admin.display(description="saved environ")
    def saved_environ(self, job: QueuedJob) -> SafeString | str:
        saved = SavedEnviron.objects.filter(queued_job=job).first()
        if saved is None:
            return "none (the job is not waiting for workers)"
        url = admin_url("evalmgr_savedenviron_change", saved.pk)
        return format_html(
            '<a href="{}">saved environ {}</a>, saved {} ago{}',
            url,
            saved.pk,
            age(saved.save_time),
            pre(pretty_json(saved.environ)),
        )

    @admin.display(description="received results")
    def received_results(self, job: QueuedJob) -> SafeString | str:
        results = ReceivedResult.objects.filter(job_id=job.job_id).order_by("-received_at")[:20]
        if not results:
            return "none yet"
        return format_html_join(
            mark_safe("<br>"),
            '<a href="{}">{}</a> ({}, {} ago)',
            (
                (
                    admin_url("workers_receivedresult_change", r.pk),
                    r.message_id or r.key,
                    r.outcome,
                    age(r.received_at),
                )
                for r in results
            ),
        )

    @admin.display(description="pending runs")
    def pending_runs(self, job: QueuedJob) -> SafeString | str:
        runs = PendingRun.objects.filter(job_id=job.job_id)
        if not runs:
            return "none"
        return format_html_join(
            mark_safe("<br>"),
            '<a href="{}">run {}</a> (attempts: {}, claimed by {})',
            (
                (
                    admin_url("workers_pendingrun_change", run.pk),
                    run.pk,
                    run.attempts,
                    run.claimed_by or "nobody",
                )
                for run in runs
            ),
        )


class SavedAgeFilter(AgeFilter):
    title = "saved"
    field_name = "save_time"


class JobStateFilter(admin.SimpleListFilter):
    title = "job state"
    parameter_name = "job_state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(state, state) for state, _ in QueuedJob._meta.get_field("state").choices or []]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value():
            return queryset.filter(queued_job__state=self.value())
        return None


class SavedNeedsAttentionFilter(NeedsAttentionFilter):
    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "stale":
            return queryset.filter(
                queued_job__state__in=WAITING_STATES, queued_job__creation_date__lt=stale_cutoff()
            )
        return None


class SavedEnvironAdmin(KeptRowsMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    # Kept: without its saved environ a job waits for ever (its result is then "already resumed,
    # ignoring"); an operator who gives a job up deletes the job, which takes this row with it.
    list_display = ["id", "job_column", "state_column", "submission_column", "age_column"]
    list_filter = [SavedNeedsAttentionFilter, JobStateFilter, SavedAgeFilter]
    list_select_related = ["queued_job"]
    search_fields = ["queued_job__job_id", "queued_job__submission_id__exact"]
    search_help_text = "Job id (or part of it), or the exact submission id."
    ordering = ["-save_time"]
    readonly_fields = (
        "job_column",
        "state_column",
        "submission_column",
        "save_time",
        "environ_pretty",
    )
    fields = readonly_fields

    @admin.display(description="job", ordering="queued_job__job_id")
    def job_column(self, saved: SavedEnviron) -> SafeString:
        return job_link(saved.queued_job_id)

    @admin.display(description="state", ordering="queued_job__state")
    def state_column(self, saved: SavedEnviron) -> SafeString:
        return state_badge(saved.queued_job)

    @admin.display(description="submission id", ordering="queued_job__submission_id")
    def submission_column(self, saved: SavedEnviron) -> int | None:
        return saved.queued_job.submission_id

    @admin.display(description="waiting for", ordering="-save_time")
    def age_column(self, saved: SavedEnviron) -> str:
        return age(saved.save_time)

    @admin.display(description="environ")
    def environ_pretty(self, saved: SavedEnviron) -> SafeString:
        return pre(pretty_json(saved.environ))
