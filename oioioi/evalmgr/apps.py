from django.apps import AppConfig


class EvalmgrAppConfig(AppConfig):
    name = "oioioi.evalmgr"
    label = "evalmgr"
    verbose_name = "Evaluation manager"
    default_auto_field = "django.db.models.AutoField"
