"""A PostgreSQL failover seen from the consumer: for a while the server answers, but refuses writes."""

from __future__ import annotations

import time

import pytest

from oioioi.workers.models import ReceivedResult
from tests.conftest import BrokerClient, make_settings, result_for
from tests.faults import PgFaults, consumer_database_url, queue_counts
from tests.helpers import job_done, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_read_only_database_is_an_outage_not_the_messages_fault(
    private_broker, start_consumer, waiting_job
):
    settings = make_settings(private_broker.url)
    client = BrokerClient(settings)
    jobs = [waiting_job(submission_id=i) for i in range(5)]
    consumer = start_consumer(
        settings=settings,
        DATABASE_URL=consumer_database_url(),
        RESULTS_DB_RETRY_ATTEMPTS="2",
        RESULTS_DB_RETRY_MAX="0.2",
        RESULTS_DB_PROBE_MAX="0.5",
    )
    pg = PgFaults()
    try:
        # Given a database that answers but refuses writes
        pg.read_only()
        # When results arrive
        for sent in jobs:
            client.publish_env(result_for(sent))
        consumer.wait_for_log("read-only")
        # Then they are held, long past the in-process budget, and none is dead-lettered or
        # sent round the retry queue (which would spend its retry budget)
        time.sleep(6)
        assert client.depth(settings.dead_letter_queue) == 0
        assert client.depth(settings.retry_queue) == 0
        assert not ReceivedResult.objects.exists()
        assert sum(queue_counts(private_broker, settings.queue)) == len(jobs)
    finally:
        pg.close()
    # And once the primary takes writes again, everything is applied once
    for sent in jobs:
        wait_until(job_done(sent["job_id"]), timeout=60, what="the jobs after the failover")
    assert ReceivedResult.objects.filter(outcome="resumed").count() == len(jobs)
    assert "retrying in" not in consumer.log
    assert "Database is back" in consumer.log
    assert consumer.stop() == 0
