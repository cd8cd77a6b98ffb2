from django.apps import AppConfig


class SioworkersAppConfig(AppConfig):
    name = "oioioi.sioworkers"
    label = "sioworkers"
    verbose_name = "Sioworkers"
