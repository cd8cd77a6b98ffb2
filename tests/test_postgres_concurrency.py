"""Two consumer processes on PostgreSQL receiving the same results at the same time."""

from __future__ import annotations

import time

import pytest

from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.models import ReceivedResult
from tests.conftest import result_for
from tests.recipeapp.models import StepLog

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_same_message_to_two_consumers_has_one_effect(broker, start_consumer, waiting_job):
    # Given 40 waiting jobs, each result published twice under the same message id, and a
    # third time under another id (sioworkersd resending the same group).
    jobs = [waiting_job(submission_id=i) for i in range(40)]
    for sent in jobs:
        result = result_for(sent)
        for message_id in (result["group_id"], result["group_id"], "again-" + result["group_id"]):
            broker.publish_env(result, message_id=message_id)
    # When two consumers race for them, one message at a time each
    first = start_consumer("--batch-size", "1", "--prefetch", "1", ready=False)
    second = start_consumer("--batch-size", "1", "--prefetch", "1", ready=False)
    # Then every job ran its recipe exactly once and every message was acked
    deadline = time.monotonic() + 60
    while ReceivedResult.objects.count() < 80 or broker.depth() > 0:
        assert time.monotonic() < deadline, "results were not all settled"
        time.sleep(0.1)
    for sent in jobs:
        assert StepLog.objects.filter(job_id=sent["job_id"]).count() == 1
        assert not QueuedJob.objects.filter(job_id=sent["job_id"]).exists()
    assert ReceivedResult.objects.filter(outcome="resumed").count() == 40
    assert ReceivedResult.objects.filter(outcome="ignored").count() == 40
    assert broker.depth(broker.settings.dead_letter_queue) == 0
    # Both really took part, and the duplicates were recognised by the inbox.
    assert "committed" in first.log and "committed" in second.log
    assert "duplicate" in first.log + second.log
    assert first.stop() == 0 and second.stop() == 0
