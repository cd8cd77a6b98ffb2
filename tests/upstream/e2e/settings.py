"""Settings of the end-to-end tests inside upstream OIOIOI: upstream's own test settings, plus a
real PostgreSQL, the real RabbitMQ, Celery handing tasks to real workers (not eager) and a
filetracker server that every process shares.

The pytest process creates the test database; the processes a test starts (consumer, Celery
worker, shim) get its name in ``RESULTS_E2E_DATABASE`` and the run's queue names in
``RESULTS_E2E_RUN``, so that they share the database and queues with the test and with nothing
else. ``RESULTS_E2E_TMP`` (the run's scratch folder) and ``RESULTS_E2E_FILETRACKER_URL`` are
chosen by the first process that loads this module and inherited by the others the same way.
"""

import os
import socket
import tempfile

from oioioi.test_settings import *  # noqa: F403
from oioioi.test_settings import INSTALLED_APPS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN = os.environ.setdefault("RESULTS_E2E_RUN", os.urandom(4).hex())
#: The run's scratch folder: the filetracker's store and caches, what the recording sioworkers
#: backend records, the processes' logs.
if "RESULTS_E2E_TMP" not in os.environ:
    os.environ["RESULTS_E2E_TMP"] = tempfile.mkdtemp(prefix=f"results-e2e-{RUN}-")
TMP = os.environ["RESULTS_E2E_TMP"]
if "RESULTS_E2E_FILETRACKER_URL" not in os.environ:
    os.environ["RESULTS_E2E_FILETRACKER_URL"] = f"http://127.0.0.1:{_free_port()}"


# The tests' own recipe steps and their record of each step that ran (results_e2e.models).
INSTALLED_APPS = (*INSTALLED_APPS, "results_e2e")

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

# Celery as a deployment runs it: tasks go to the broker and real workers run them.
CELERY_ALWAYS_EAGER = False
BROKER_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: The results' broker: Celery's, unless a test gives a process a private node of its own
#: (test_sioworkersd.py stops one under sioworkersd).
AMQP_URL = os.environ.get("RESULTS_E2E_AMQP_URL") or BROKER_URL
CELERY_ROUTES = {
    "oioioi.evalmgr.tasks.evalmgr_job": {"queue": f"evalmgr-{RUN}"},
    "oioioi.problems.unpackmgr.unpackmgr_job": {"queue": f"unpackmgr-{RUN}"},
}

# Upstream's test settings keep files in a filetracker client's memory, which no other process
# sees: here every process uses one filetracker server (started by the tests, conftest.py).
FILETRACKER_CLIENT_FACTORY = "oioioi.filetracker.client.remote_storage_factory"
FILETRACKER_URL = os.environ["RESULTS_E2E_FILETRACKER_URL"]
FILETRACKER_CACHE_ROOT = os.path.join(TMP, "filetracker-cache", str(os.getpid()))

# Who runs sioworkers' jobs in a Celery worker: the tests start workers with one or the other
# (results_e2e.backends.RecordingBackend records the group instead; QueueBackend runs it and
# publishes the result to the queue).
SIOWORKERS_BACKEND = os.environ.get(
    "RESULTS_E2E_SIOWORKERS_BACKEND", "results_e2e.backends.RecordingBackend"
)

# The return path's queues, this run's own.
RESULTS_EXCHANGE = f"e2e-{RUN}.workers"
RESULTS_QUEUE = f"e2e-{RUN}.results"
RESULTS_DEAD_LETTER_QUEUE = f"e2e-{RUN}.results.dead"
RESULTS_RETRY_QUEUE = f"e2e-{RUN}.results.retry"
RESULTS_RETRY_DELAY_MS = 300
# The tests look at the broker's dead-letter queue; those of the operator pages let the consumer
# move dead letters into the database (its default) with RESULTS_DEAD_LETTER_ARCHIVE=true.
RESULTS_DEAD_LETTER_ARCHIVE = os.environ.get("RESULTS_DEAD_LETTER_ARCHIVE", "false") == "true"
RESULTS_MAX_RETRIES = 2
RESULTS_DB_RETRY_INITIAL = 0.05
RESULTS_DB_RETRY_MAX = 0.5
RESULTS_DB_PROBE_MAX = 1.0

# Upstream's LOGGING as it is: it configures only its "oioioi" logger, and the commands give the
# queue library's "consumer" logger the same handlers (oioioi.workers.logging); the tests that
# wait for "Consuming from" and "Result ... committed" show that they do.

# Where upstream's SioworkersdBackend sends job groups (a real sioworkersd, test_sioworkersd.py),
# and the return URL it gives them: None (upstream's default, built from the address and port
# below), the shim's URL, or "amqp:".
SIOWORKERSD_URL = os.environ.get("RESULTS_E2E_SIOWORKERSD_URL", "http://127.0.0.1:7889/")
SIOWORKERS_LISTEN_URL = os.environ.get("RESULTS_E2E_LISTEN_URL") or None

# Where upstream's own receiver (kept as legacy_receive_from_workers) listens, per process.
SIOWORKERS_LISTEN_ADDR = "127.0.0.1"
SIOWORKERS_LISTEN_PORT = int(os.environ.get("RESULTS_E2E_LISTEN_PORT", "7890"))
