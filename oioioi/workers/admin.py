from django.contrib import admin

from oioioi.workers.models import PendingRun, ReceivedResult


@admin.register(ReceivedResult)
class ReceivedResultAdmin(admin.ModelAdmin):
    list_display = ["key", "outcome", "job_id", "group_id", "submission_id", "received_at"]
    list_filter = ["outcome"]
    search_fields = ["key", "message_id", "group_id", "job_id"]


@admin.register(PendingRun)
class PendingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "job_id", "attempts", "claimed_by", "claimed_until", "created_at"]
    search_fields = ["job_id"]
