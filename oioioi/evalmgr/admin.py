from django.contrib import admin

from oioioi.evalmgr.models import QueuedJob, SavedEnviron


@admin.register(QueuedJob)
class QueuedJobAdmin(admin.ModelAdmin):
    list_display = ["job_id", "state", "submission_id", "creation_date"]
    list_filter = ["state"]
    search_fields = ["job_id", "submission_id"]
    ordering = ["-creation_date"]


@admin.register(SavedEnviron)
class SavedEnvironAdmin(admin.ModelAdmin):
    list_display = ["id", "queued_job", "save_time"]
    search_fields = ["queued_job__job_id"]
    readonly_fields = ["queued_job", "environ", "save_time"]
