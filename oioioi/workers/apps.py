from django.apps import AppConfig


class WorkersAppConfig(AppConfig):
    name = "oioioi.workers"
    label = "workers"
    verbose_name = "Workers return path"
    default_auto_field = "django.db.models.BigAutoField"
