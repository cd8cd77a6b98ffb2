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

# --- Broker and queue topology -----------------------------------------------------------------

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: Durable direct exchange workers publish finished environs to.
RESULTS_EXCHANGE = os.environ.get("RESULTS_EXCHANGE", "oioioi.workers")
RESULTS_ROUTING_KEY = os.environ.get("RESULTS_ROUTING_KEY", "results")
RESULTS_QUEUE = os.environ.get("RESULTS_QUEUE", "oioioi.workers.results")
RESULTS_DEAD_LETTER_QUEUE = os.environ.get(
    "RESULTS_DEAD_LETTER_QUEUE", "oioioi.workers.results.dead"
)
RESULTS_RETRY_QUEUE = os.environ.get("RESULTS_RETRY_QUEUE", "oioioi.workers.results.retry")
#: Declare the exchange and queues on connect. Turn off where the broker's definitions create
#: them and the user may not configure (the least-privilege users of deploy/rabbitmq).
RESULTS_DECLARE_TOPOLOGY = _env_bool("RESULTS_DECLARE_TOPOLOGY", True)
#: ``quorum`` (replicated, with a delivery limit) or ``classic`` for brokers without quorum queues.
RESULTS_QUEUE_TYPE = os.environ.get("RESULTS_QUEUE_TYPE", "quorum")
#: Deliveries after which the broker dead-letters a message that keeps killing its consumer.
RESULTS_DELIVERY_LIMIT = _env_int("RESULTS_DELIVERY_LIMIT", 20)
#: Times an unexpected write error is retried through the retry queue before dead-lettering.
RESULTS_MAX_RETRIES = _env_int("RESULTS_MAX_RETRIES", 5)
#: How long a message waits in the retry queue before it returns to the results queue.
RESULTS_RETRY_DELAY_MS = _env_int("RESULTS_RETRY_DELAY_MS", 10_000)
#: Unacknowledged deliveries the broker may push ahead (held in the consumer's memory).
RESULTS_PREFETCH = _env_int("RESULTS_PREFETCH", 200)
#: Most results written in one transaction, and most bytes of their message bodies.
RESULTS_BATCH_SIZE = _env_int("RESULTS_BATCH_SIZE", 100)
RESULTS_BATCH_BYTES = _env_int("RESULTS_BATCH_BYTES", 8 * 1024 * 1024)
AMQP_HEARTBEAT = _env_int("AMQP_HEARTBEAT", 30)
AMQP_BLOCKED_CONNECTION_TIMEOUT = _env_float("AMQP_BLOCKED_CONNECTION_TIMEOUT", 60.0)

# --- Database retry policy ---------------------------------------------------------------------

#: In-process attempts at a write that fails with a transient database error.
RESULTS_DB_RETRY_ATTEMPTS = _env_int("RESULTS_DB_RETRY_ATTEMPTS", 5)
RESULTS_DB_RETRY_INITIAL = _env_float("RESULTS_DB_RETRY_INITIAL", 0.2)
RESULTS_DB_RETRY_MAX = _env_float("RESULTS_DB_RETRY_MAX", 5.0)
#: Longest pause between database probes while the database is away.
RESULTS_DB_PROBE_MAX = _env_float("RESULTS_DB_PROBE_MAX", 30.0)
#: Received-results records older than this many days may be removed.
RESULTS_INBOX_RETENTION_DAYS = _env_int("RESULTS_INBOX_RETENTION_DAYS", 30)

# --- Evaluation manager ------------------------------------------------------------------------

#: Hands a resumed environ to the recipe runner after the resume commits.
EVALMGR_DISPATCHER = os.environ.get("EVALMGR_DISPATCHER", "oioioi.evalmgr.dispatch.LocalDispatcher")
#: Sends a job group to sioworkersd; the null backend only logs (a real deployment sets its own).
SIOWORKERS_BACKEND = os.environ.get("SIOWORKERS_BACKEND", "oioioi.sioworkers.backends.NullBackend")
FILETRACKER_URL = os.environ.get("FILETRACKER_URL") or None
#: Jobs WAITING or QUEUED longer than this are flagged for an operator.
EVALMGR_STALE_JOB_SECONDS = _env_int("EVALMGR_STALE_JOB_SECONDS", 3600)
#: How long a recipe runner's claim on a pending run holds; a runner killed mid-recipe leaves
#: its run to others once this has passed. Must exceed the longest recipe phase.
EVALMGR_RUN_LEASE_SECONDS = _env_int("EVALMGR_RUN_LEASE_SECONDS", 300)

# --- Legacy HTTP shim ----------------------------------------------------------------------------

SIOWORKERS_LISTEN_ADDR = os.environ.get("SIOWORKERS_LISTEN_ADDR", "127.0.0.1")
SIOWORKERS_LISTEN_PORT = _env_int("SIOWORKERS_LISTEN_PORT", 7890)
SHIM_MAX_BODY_BYTES = _env_int("SHIM_MAX_BODY_BYTES", 64 * 1024 * 1024)
SHIM_THREADS = _env_int("SHIM_THREADS", 16)
SHIM_READ_TIMEOUT = _env_float("SHIM_READ_TIMEOUT", 30.0)
SHIM_AUTH_TOKEN = os.environ.get("SHIM_AUTH_TOKEN") or None

# --- Observability -------------------------------------------------------------------------------

#: Port of /healthz, /readyz and /metrics (consumer and shim); off when unset.
METRICS_PORT = _env_int("METRICS_PORT", 0) or None
#: Address the health and metrics port listens on (all interfaces, so a scraper can reach it).
METRICS_ADDR = os.environ.get("METRICS_ADDR", "0.0.0.0")
LOG_FORMAT = os.environ.get("LOG_FORMAT", "human")
LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO")

#: ``human`` or ``json`` (one object per line); see oioioi/workers/logging.py. Both formats remove
#: the passwords of these URLs and these secrets from every line.
LOGGING = logging_config(
    LOG_FORMAT, LOG_LEVEL, [AMQP_URL, DATABASE_URL, SHIM_AUTH_TOKEN, SECRET_KEY]
)
