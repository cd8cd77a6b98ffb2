"""Tools of the fault and chaos tests: PostgreSQL outages, queue counts, bulk waiting jobs."""

from __future__ import annotations

import copy
import json
import os
import uuid
from typing import Any

import psycopg

from tests.broker import RabbitNode

#: The ``application_name`` consumer processes connect with, so only their sessions are cut.
CONSUMER_APP = "oioioi-consumer"


def consumer_database_url() -> str:
    """The test database's URL as consumer processes get it, tagged with CONSUMER_APP."""
    from tests.conftest import database_url

    url = database_url()
    return f"{url}?application_name={CONSUMER_APP}" if url.startswith("postgres") else url


class PgFaults:
    """Cuts the consumers off the test database, through an admin session on another database."""

    def __init__(self) -> None:
        from django.db import connection

        self.dbname = connection.settings_dict["NAME"]
        admin_url = (
            os.environ.get("TEST_DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres"
        )
        self._admin = psycopg.connect(admin_url, autocommit=True)
        self.down = False

    def terminate(self) -> int:
        """Terminate every session of a consumer process; returns how many there were."""
        row = self._admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s",
            (self.dbname, CONSUMER_APP),
        ).fetchone()
        return int(row[0]) if row else 0

    def outage(self) -> None:
        """No new connections to the test database, and the consumers' sessions are cut."""
        self._admin.execute(f'ALTER DATABASE "{self.dbname}" ALLOW_CONNECTIONS false')
        self.down = True
        self.terminate()

    def restore(self) -> None:
        self._admin.execute(f'ALTER DATABASE "{self.dbname}" ALLOW_CONNECTIONS true')
        self._admin.execute(f'ALTER DATABASE "{self.dbname}" RESET default_transaction_read_only')
        self.down = False

    def read_only(self) -> None:
        """New sessions refuse writes, as on a primary demoted during a failover."""
        self._admin.execute(
            f'ALTER DATABASE "{self.dbname}" SET default_transaction_read_only = on'
        )
        self.down = True
        self.terminate()

    def close(self) -> None:
        if self.down:
            self.restore()
        self._admin.close()


def queue_counts(node: RabbitNode, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of ``queue`` on a private node."""
    out = node.ctl(
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    )
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {queue!r} not found on {node.name}:\n{out}")


def waiting_jobs(template: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """``count`` more jobs WAITING for sioworkers, shaped like ``template`` (from ``waiting_job``).

    Written in bulk (a real resume of each would take minutes): a QueuedJob in state WAITING and
    the SavedEnviron the transfer phase would have left. Returns the environs sent out.
    """
    from django.db import transaction

    from oioioi.evalmgr.models import QueuedJob, SavedEnviron

    saved_template = SavedEnviron.objects.get(id=template["saved_environ_id"]).load_environ()
    environs = []
    for i in range(count):
        env = copy.deepcopy(saved_template)
        env["job_id"] = uuid.uuid4().urn
        env["submission_id"] = 10_000 + i
        env["workers_jobs"] = {"job0": {"job_type": "ping", "ping": env["job_id"]}}
        environs.append(env)
    with transaction.atomic():
        QueuedJob.objects.bulk_create(
            QueuedJob(job_id=e["job_id"], state="WAITING", submission_id=e["submission_id"])
            for e in environs
        )
        saved = SavedEnviron.objects.bulk_create(
            SavedEnviron(queued_job_id=e["job_id"], environ=json.dumps(e)) for e in environs
        )
    sent = []
    for env, row in zip(environs, saved, strict=True):
        out = dict(env)
        out["saved_environ_id"] = row.id
        for field in ("recipe", "error_handlers", "restore_environ_func"):
            out.pop(field, None)
        sent.append(out)
    return sent
