"""A PostgreSQL failover inside upstream OIOIOI, whose driver is psycopg2: for a while the server
answers but refuses writes. The consumer must recognise that by its SQLSTATE (psycopg2 names it
``pgcode``, psycopg 3 ``sqlstate``) and wait for the primary, not blame the messages."""

from __future__ import annotations

import time

import pytest
from django.db import connection
from results_e2e.conftest import job_finished, sent_group, sioworkersd_result, wait_until

from consumer.publish import publish
from oioioi.workers.models import ReceivedResult

pytestmark = pytest.mark.django_db(transaction=True)


def _others_sessions(dbname: str) -> None:
    """End every session of the test database but this process's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [dbname],
        )


def test_a_read_only_database_holds_the_results_until_it_takes_writes_again(
    start_worker, start_consumer, park_job, broker, run_settings, migrated_db
):
    import psycopg2  # noqa: F401  (upstream's driver is the one under test)

    assert connection.vendor == "postgresql"
    connection.ensure_connection()  # an earlier test may have closed it
    assert type(connection.connection).__module__.startswith("psycopg2")
    # Given three parked jobs, and no Celery worker while the database is away
    worker = start_worker()
    envs = [park_job() for _ in range(3)]
    results = [sioworkersd_result(sent_group(env["job_id"])) for env in envs]
    worker.stop()
    consumer = start_consumer(
        RESULTS_DB_RETRY_ATTEMPTS="2", RESULTS_DB_RETRY_MAX="0.2", RESULTS_DB_PROBE_MAX="0.5"
    )
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER DATABASE "{migrated_db}" SET default_transaction_read_only = on')
    _others_sessions(migrated_db)
    try:
        # When their results arrive while the server refuses writes
        for result in results:
            publish(result, run_settings)
        consumer.wait_for_log("read-only")
        # Then they are held, long past the in-process retry budget, and none is dead-lettered
        # or sent round the retry queue
        time.sleep(4)
        assert broker.depth(run_settings.dead_letter_queue) == 0
        assert broker.depth(run_settings.retry_queue) == 0
        assert not ReceivedResult.objects.exists()
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{migrated_db}" RESET default_transaction_read_only')
    # And once it takes writes again, every job resumes once and finishes in a worker
    worker = start_worker()
    for env in envs:
        wait_until(job_finished(env["job_id"]), timeout=60, what="the jobs after the failover")
    assert ReceivedResult.objects.filter(outcome="resumed").count() == len(envs)
    assert "Database is back" in consumer.log
