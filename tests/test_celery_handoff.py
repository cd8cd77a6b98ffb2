"""The hand-off to Celery (``CeleryDispatcher``): the outbox relayed to real Celery workers.

Inside an OIOIOI the recipes run in its Celery evalmgr workers. The consumer writes the resumed
environ as a pending run in the resume's transaction, and after the commit relays it to the
evalmgr queue with publisher confirms; the worker's task claims the run and runs upstream's
``evalmgr_job`` on it. These tests run a real Celery worker (the stand-in's app, as upstream's
``celery -A oioioi.celery worker``) against a real broker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from oioioi.workers import tasks
from oioioi.workers.dispatch import CeleryDispatcher, get_dispatcher
from oioioi.workers.models import PendingRun
from oioioi.workers.resume import delay_environs
from tests.conftest import celery_env, result_for
from tests.helpers import job_done, wait_until
from tests.recipeapp.models import StepLog

pytestmark = pytest.mark.django_db(transaction=True)

CELERY = "oioioi.workers.dispatch.CeleryDispatcher"


@contextlib.contextmanager
def relaying_to(amqp_url: str, queue: str) -> Iterator[CeleryDispatcher]:
    """This process relays to real workers on ``queue`` (the tests' Celery is eager otherwise)."""
    conf = tasks.run_pending_job.app.conf
    saved = (conf.task_always_eager, conf.broker_url, conf.task_routes)
    routes = {"oioioi.evalmgr.tasks.evalmgr_job": {"queue": queue}}
    conf.task_always_eager, conf.broker_url, conf.task_routes = False, amqp_url, routes
    amqp = tasks.run_pending_job.app.amqp
    amqp.flush_routes()  # the router is built from the routes once, and cached
    amqp.__dict__.pop("router", None)
    try:
        with override_settings(EVALMGR_DISPATCHER=CELERY):
            dispatcher = get_dispatcher()
            assert isinstance(dispatcher, CeleryDispatcher)
            yield dispatcher
    finally:
        conf.task_always_eager, conf.broker_url, conf.task_routes = saved
        amqp.flush_routes()
        amqp.__dict__.pop("router", None)


def steps(job_id: str) -> list[str]:
    return list(StepLog.objects.filter(job_id=job_id).values_list("step", flat=True))


def test_a_resumed_job_is_relayed_after_the_commit_and_run_by_a_celery_worker_once(
    waiting_job, broker, queue_settings, celery_queue, start_consumer, start_celery_worker
):
    # Given a job waiting for its results, an evalmgr worker, and a consumer relaying to Celery
    sent = waiting_job()
    worker = start_celery_worker()
    consumer = start_consumer(EVALMGR_DISPATCHER=CELERY, **celery_env(queue_settings, celery_queue))
    # When the result arrives
    broker.publish_env(result_for(sent), message_id="celery-1")
    # Then the worker ran the rest of the recipe, once, and the run is gone
    wait_until(job_done(sent["job_id"]), what="the job to finish in the Celery worker")
    assert steps(sent["job_id"]) == ["after-results"]
    wait_until(lambda: "oioioi.workers.tasks.run_pending_job[run-" in worker.log)
    assert "succeeded" in worker.log
    assert "recipes relayed to Celery's evalmgr workers" in consumer.log
    assert broker.depth() == 0


def test_a_run_relayed_twice_runs_once(waiting_job, amqp_url, celery_queue, start_celery_worker):
    # Given a resumed job whose run was handed to Celery twice (a relay that died before it
    # recorded its publish, then the sweep)
    sent = waiting_job()
    worker = start_celery_worker()
    with relaying_to(amqp_url, celery_queue):
        with transaction.atomic():
            (handle,) = delay_environs([result_for(sent)])
        run = PendingRun.objects.get(job_id=sent["job_id"])
        assert handle == f"run-{run.pk}"
        tasks.publish([run.pk])
        tasks.publish([run.pk])
    # Then both tasks ran, and the recipe ran once
    wait_until(job_done(sent["job_id"]), what="the job to finish")
    wait_until(lambda: worker.log.count("succeeded") >= 2, what="both tasks to run")
    assert steps(sent["job_id"]) == ["after-results"]
    assert "held by another runner or already done" in worker.log


def test_a_run_whose_relay_died_is_relayed_again_by_the_sweep(
    waiting_job, amqp_url, celery_queue, start_celery_worker
):
    # Given a run claimed by a relay that died before publishing (its claim has expired)
    sent = waiting_job()
    start_celery_worker()
    with relaying_to(amqp_url, celery_queue) as dispatcher:
        with transaction.atomic():
            delay_environs([result_for(sent)])
        PendingRun.objects.update(
            claimed_by="relay:dead-host:1:0", claimed_until=timezone.now() - timedelta(seconds=1)
        )
        # When a sweep runs (a consumer's, or run_pending_jobs)
        assert dispatcher.run_pending() == 1
        # Then it was relayed and recorded as such, and the worker runs it
        run = PendingRun.objects.filter(job_id=sent["job_id"]).first()
        assert run is None or run.claimed_by != "relay:dead-host:1:0"
    wait_until(job_done(sent["job_id"]), what="the job to finish")
    assert steps(sent["job_id"]) == ["after-results"]


def test_a_relay_the_broker_refuses_leaves_the_run_for_the_next_sweep(waiting_job, celery_queue):
    # Given no broker where Celery publishes
    sent = waiting_job()
    with relaying_to("amqp://guest:guest@127.0.0.1:9/%2F", celery_queue) as dispatcher:
        with transaction.atomic():
            delay_environs([result_for(sent)], run_here=True)
        # When the relay after the commit fails
        assert dispatcher.run_pending(sweep=False) == 0
    # Then the run is still there, claimed for the short hand-off only, not lost
    run = PendingRun.objects.get(job_id=sent["job_id"])
    assert run.claimed_by.startswith("relay:")
    assert run.claimed_until < timezone.now() + timedelta(seconds=11)
    assert run.attempts == 0
