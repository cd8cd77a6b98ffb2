"""Settings for the results consumer, read from the environment.

Every value has a default that works on a single machine (SQLite in the project's data directory, the
local RabbitMQ as guest). Another settings module may ``from oioioi.settings import *`` and override
anything; the consumer reads these names through ``django.conf.settings`` only when a command starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url

from oioioi.workers.conf import from_environment
from oioioi.workers.logging import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

#: Where the SQLite default database and other local state live.
DATA_DIR = Path(os.environ.get("OIOIOI_DATA_DIR", BASE_DIR / "data"))


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value is None or value == "" else float(value)


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-development-key-change-me")
DEBUG = _env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = [
    h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "oioioi.celery",
    "oioioi.evalmgr",
    "oioioi.sioworkers",
    "oioioi.workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "oioioi.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = "oioioi.wsgi.application"
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# --- Database --------------------------------------------------------------------------------


def database_config(url: str) -> dict[str, Any]:
    """A Django database entry from a URL, with what SQLite needs to be shared by processes."""
    config: dict[str, Any] = dict(
        dj_database_url.parse(
            url, conn_max_age=_env_int("DATABASE_CONN_MAX_AGE", 60), conn_health_checks=True
        )
    )
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Several processes (consumer, admin, tests) share the file: wait for the lock instead of
        # failing at once, take the write lock when a transaction starts (no deadlocking lock
        # upgrades), and let readers run beside the writer.
        config["OPTIONS"] = {
            "timeout": _env_float("SQLITE_BUSY_TIMEOUT", 20.0),
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    return config


DATABASE_URL = os.environ.get("DATABASE_URL") or ""
if not DATABASE_URL:
    # The embedded default: an SQLite file in the data directory, which a fresh clone lacks.
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASE_URL = f"sqlite:///{DATA_DIR / 'oioioi.sqlite3'}"
DATABASES = {"default": database_config(DATABASE_URL)}

# --- The return path ---------------------------------------------------------------------------
# Every setting of the return path (AMQP_URL, RESULTS_*, SHIM_*, METRICS_*, EVALMGR_*) has its
# default in oioioi/workers/conf.py and is read from the environment variable of the same name
# there, as it is inside an OIOIOI deployment; this module may still set any of them.

#: Standalone, the consumer's own runner process runs the recipes, on the second core (inside
#: OIOIOI the default hands them to Celery's evalmgr workers; ``...dispatch.LocalDispatcher`` runs
#: them in the consumer's process itself).
EVALMGR_DISPATCHER = os.environ.get(
    "EVALMGR_DISPATCHER", "oioioi.workers.runner_process.ProcessDispatcher"
)
#: Sends a job group to sioworkersd; the null backend only logs (a real deployment sets its own).
SIOWORKERS_BACKEND = os.environ.get("SIOWORKERS_BACKEND", "oioioi.sioworkers.backends.NullBackend")
FILETRACKER_URL = os.environ.get("FILETRACKER_URL") or None

# --- Celery, as upstream configures it (old-style names, read by oioioi.celery) -------------------

#: The broker Celery publishes evalmgr_job to; by default the results broker.
BROKER_URL = os.environ.get("CELERY_BROKER_URL") or from_environment("AMQP_URL")
#: Standalone nothing runs a Celery worker: the stand-in's delay_environ runs evalmgr_job at once,
#: as upstream's tests do. Set CELERY_ALWAYS_EAGER=0 to hand tasks to real workers.
CELERY_ALWAYS_EAGER = _env_bool("CELERY_ALWAYS_EAGER", True)
CELERY_ACKS_LATE = True
CELERY_IMPORTS = ["oioioi.evalmgr.tasks"]
#: Upstream routes evalmgr_job to the queue its evalmgr workers read (``celery -A oioioi.celery
#: worker -Q evalmgr``); the return path's relay sends its tasks there too.
CELERY_ROUTES = {
    "oioioi.evalmgr.tasks.evalmgr_job": {"queue": os.environ.get("EVALMGR_CELERY_QUEUE", "evalmgr")}
}

# --- Observability -------------------------------------------------------------------------------

LOG_FORMAT = os.environ.get("LOG_FORMAT", "human")
LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO")

#: ``human`` or ``json`` (one object per line); see oioioi/workers/logging.py. Both formats remove
#: the passwords of these URLs and these secrets from every line.
LOGGING = logging_config(
    LOG_FORMAT,
    LOG_LEVEL,
    [
        from_environment("AMQP_URL"),
        BROKER_URL,
        DATABASE_URL,
        from_environment("SHIM_AUTH_TOKEN"),
        SECRET_KEY,
    ],
)
