"""QueueBackend: a job group run in-process like upstream's LocalBackend, its result returned
through the real broker to a real consumer process, which resumes the job."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.evalmgr.tasks import delay_environ
from oioioi.workers.models import ReceivedResult
from tests.helpers import job_done, wait_until
from tests.recipeapp.models import StepLog
from tests.recipeapp.recipes import new_job_environ

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE_BACKEND = "oioioi.workers.backends.QueueBackend"


@pytest.fixture
def queue_backend(settings: Any, project_queues: Any) -> Any:
    """This process transfers jobs through QueueBackend, publishing to this test's queues."""
    settings.SIOWORKERS_BACKEND = QUEUE_BACKEND
    # The queues' arguments too, or the publisher's declaration would not match the consumer's.
    settings.RESULTS_RETRY_DELAY_MS = project_queues.retry_delay_ms
    settings.RESULTS_DELIVERY_LIMIT = project_queues.delivery_limit
    return project_queues


def steps(job_id: str) -> list[str]:
    return list(StepLog.objects.filter(job_id=job_id).order_by("id").values_list("step", flat=True))


def test_a_job_transferred_through_queue_backend_resumes_through_the_queue(
    queue_backend, broker, start_consumer
):
    # When a job is transferred to sioworkers through QueueBackend (Celery eager: the transfer
    # runs inside this transaction)
    env = new_job_environ(submission_id=77)
    with transaction.atomic():
        delay_environ(env)
        # Then its result waits for the commit of the job's saved environ
        assert broker.depth(broker.settings.queue) == 0
    broker.wait_depth(broker.settings.queue, 1)
    # And once a consumer runs, the result resumes the job: the ping job ran here, its result
    # came back through the queue under a new group id, and the rest of the recipe ran once
    consumer = start_consumer()
    wait_until(job_done(env["job_id"]), what="the job resumed through the queue")
    assert steps(env["job_id"]) == ["after-results"]
    assert StepLog.objects.get(job_id=env["job_id"]).detail == '["job0"]'
    inbox = ReceivedResult.objects.get()
    assert inbox.key.startswith("GROUP_urn:uuid:")
    assert (inbox.message_id, inbox.group_id) == (inbox.key, inbox.key)
    assert (inbox.job_id, inbox.submission_id, inbox.outcome) == (env["job_id"], 77, "resumed")
    assert not SavedEnviron.objects.exists()
    broker.wait_depth(broker.settings.queue, 0)
    assert broker.depth(broker.settings.dead_letter_queue) == 0
    assert consumer.stop() == 0


def test_a_job_transferred_twice_gets_both_results(queue_backend, broker, start_consumer):
    # The second transfer runs in the consumer's recipe runner, through QueueBackend too; the
    # environ it sends carries the first result's group id, which must not be its message id.
    start_consumer(SIOWORKERS_BACKEND=QUEUE_BACKEND)
    env = new_job_environ(
        after=[
            ("first", "tests.recipeapp.recipes.record", {"step": "first-results"}),
            ("again", "tests.recipeapp.recipes.transfer_to_workers"),
        ]
    )
    with transaction.atomic():
        delay_environ(env)
    wait_until(job_done(env["job_id"]), what="the job resumed twice")
    assert steps(env["job_id"]) == ["first-results", "after-results"]
    keys = set(ReceivedResult.objects.values_list("key", flat=True))
    assert len(keys) == 2
    assert set(ReceivedResult.objects.values_list("outcome", flat=True)) == {"resumed"}
    assert not QueuedJob.objects.exists()
    broker.wait_depth(broker.settings.queue, 0)
    assert broker.depth(broker.settings.dead_letter_queue) == 0


def test_local_backend_stand_in_runs_ping_and_resumes_in_process(settings):
    # The stand-in of upstream's LocalBackend, which QueueBackend reuses: it runs the ping job and
    # resumes the job itself, without a queue.
    settings.SIOWORKERS_BACKEND = "oioioi.sioworkers.backends.LocalBackend"
    env = new_job_environ()
    with transaction.atomic():
        delay_environ(env)
    assert steps(env["job_id"]) == ["after-results"]
    assert not QueuedJob.objects.exists()
