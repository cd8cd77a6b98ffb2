"""Settings of the end-to-end tests inside upstream OIOIOI: upstream's own test settings, plus a
real PostgreSQL, the real RabbitMQ and Celery handing tasks to real workers (not eager).

The pytest process creates the test database; the processes a test starts (consumer, Celery
worker, shim) get its name in ``RESULTS_E2E_DATABASE`` and the run's queue names in
``RESULTS_E2E_RUN``, so that they share the database and queues with the test and with nothing
else.
"""

import os
import uuid

from oioioi.test_settings import *  # noqa: F403

RUN = os.environ.setdefault("RESULTS_E2E_RUN", uuid.uuid4().hex[:8])

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("RESULTS_E2E_DATABASE", "postgres"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "ATOMIC_REQUESTS": True,
        "TEST": {"NAME": f"test_results_e2e_{RUN}"},
    }
}

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

# Celery as a deployment runs it: tasks go to the broker and real workers run them.
CELERY_ALWAYS_EAGER = False
BROKER_URL = AMQP_URL
CELERY_ROUTES = {
    "oioioi.evalmgr.tasks.evalmgr_job": {"queue": f"evalmgr-{RUN}"},
    "oioioi.problems.unpackmgr.unpackmgr_job": {"queue": f"unpackmgr-{RUN}"},
}

# The return path's queues, this run's own.
RESULTS_EXCHANGE = f"e2e-{RUN}.workers"
RESULTS_QUEUE = f"e2e-{RUN}.results"
RESULTS_DEAD_LETTER_QUEUE = f"e2e-{RUN}.results.dead"
RESULTS_RETRY_QUEUE = f"e2e-{RUN}.results.retry"
RESULTS_RETRY_DELAY_MS = 300
RESULTS_MAX_RETRIES = 2
RESULTS_DB_RETRY_INITIAL = 0.05
RESULTS_DB_RETRY_MAX = 0.5
RESULTS_DB_PROBE_MAX = 1.0
