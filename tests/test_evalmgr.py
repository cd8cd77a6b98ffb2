"""Resuming jobs through the real ORM: the return path's resume (``oioioi.workers.resume``) against
the evaluation manager's public API, and the stand-in's own behaving as upstream's does."""

from __future__ import annotations

import json

import pytest
from django.db import transaction

from oioioi.evalmgr import tasks as evalmgr
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.sioworkers.handlers import restore_job
from oioioi.workers.dispatch import get_dispatcher
from oioioi.workers.models import PendingRun
from oioioi.workers.resume import delay_environ
from tests.conftest import result_for
from tests.recipeapp.models import StepLog

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_new_job_is_transferred_and_waits(waiting_job):
    sent = waiting_job()
    job = QueuedJob.objects.get(job_id=sent["job_id"])
    assert job.state == "WAITING"
    assert job.submission_id == 1234
    assert "recipe" not in sent and sent["workers_jobs"]
    assert not PendingRun.objects.exists()


def test_delay_environ_outside_a_transaction_is_refused():
    with pytest.raises(RuntimeError, match="inside a transaction"):
        delay_environ({"job_id": "x"})
    with pytest.raises(RuntimeError, match="inside a transaction"):
        evalmgr.delay_environ({"job_id": "x"})


def test_resume_hands_off_in_its_transaction_and_runs_the_recipe_once(waiting_job):
    sent = waiting_job()
    result = result_for(sent)
    with transaction.atomic():
        handle = delay_environ(dict(result))
        # The hand-off is in the same transaction as the resume, and the job names it.
        run = PendingRun.objects.get(job_id=sent["job_id"])
        assert handle == f"run-{run.pk}"
        assert QueuedJob.objects.get(job_id=sent["job_id"]).celery_task_id == handle
    get_dispatcher().run_pending()
    assert list(StepLog.objects.values_list("step", flat=True)) == ["after-results"]
    assert not SavedEnviron.objects.exists()
    assert not QueuedJob.objects.filter(job_id=sent["job_id"]).exists()
    assert not PendingRun.objects.exists()

    # A second resume with the same saved environ id is ignored, as upstream does.
    with transaction.atomic():
        assert delay_environ(dict(result)) is None
    get_dispatcher().run_pending()
    assert StepLog.objects.count() == 1


def test_a_resume_rolled_back_leaves_no_hand_off(waiting_job):
    sent = waiting_job()
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        delay_environ(result_for(sent))
        1 / 0  # noqa: B018  (the commit fails after the resume)
    assert not PendingRun.objects.exists()
    assert SavedEnviron.objects.filter(id=sent["saved_environ_id"]).exists()
    assert QueuedJob.objects.get(job_id=sent["job_id"]).state == "WAITING"


def test_cancelled_job_is_not_resumed(waiting_job):
    sent = waiting_job()
    QueuedJob.objects.filter(job_id=sent["job_id"]).update(state="CANCELLED")
    with transaction.atomic():
        assert delay_environ(result_for(sent)) is None
    assert not QueuedJob.objects.exists()
    assert not PendingRun.objects.exists()


def test_error_from_workers_runs_error_handlers(waiting_job):
    sent = waiting_job()
    with transaction.atomic():
        delay_environ(_error_result(sent))
    get_dispatcher().run_pending()
    # remove_queuedjob_on_error forgot the job; the recipe did not go on.
    assert not QueuedJob.objects.exists()
    assert not StepLog.objects.exists()
    assert not PendingRun.objects.exists()


def _error_result(sent):
    env = result_for(sent, "validation_error_env.json")
    env.pop("workers_jobs.results", None)
    return env


def test_saved_environ_of_upstream_shape_resumes_identically():
    # A SavedEnviron as a real OIOIOI writes it: JSON with restore_environ_func and a recipe.
    job = QueuedJob.objects.create(job_id="urn:uuid:upstream", state="WAITING")
    saved_env = {
        "job_id": job.job_id,
        "recipe": [["record", "tests.recipeapp.recipes.record", {"step": "upstream"}]],
        "error_handlers": [],
        "restore_environ_func": "oioioi.sioworkers.handlers.restore_job",
        "submission_id": 7,
    }
    saved = SavedEnviron.objects.create(queued_job=job, environ=json.dumps(saved_env))
    with transaction.atomic():
        delay_environ(
            {
                "job_id": job.job_id,
                "saved_environ_id": saved.id,
                "workers_jobs.results": {"a": {"result": "OK"}},
            }
        )
    get_dispatcher().run_pending()
    assert StepLog.objects.get().step == "upstream"


def test_restore_job_refuses_stripped_fields():
    with pytest.raises(RuntimeError, match="stripped field recipe"):
        restore_job({}, {"recipe": []})


# --- the stand-in is upstream's API ---------------------------------------------------------------


def test_the_stand_ins_delay_environ_queues_evalmgr_job_as_upstream_does(waiting_job):
    # Given a waiting job (Celery eager, as in upstream's tests)
    sent = waiting_job()
    # When upstream's own delay_environ resumes it
    with transaction.atomic():
        async_result = evalmgr.delay_environ(result_for(sent))
    # Then it returns Celery's result, whose id the job recorded, and the recipe ran through
    # evalmgr_job: no hand-off row of the return path is involved
    assert async_result.get()["job_id"] == sent["job_id"]
    assert list(StepLog.objects.values_list("step", flat=True)) == ["after-results"]
    assert not QueuedJob.objects.exists()
    assert not PendingRun.objects.exists()


def test_celerys_ignore_stops_a_job_in_the_stand_in_and_in_the_runner(waiting_job):
    from celery.exceptions import Ignore

    assert evalmgr.Ignore is Ignore
    sent = waiting_job(after=[("cancel", "tests.recipeapp.recipes.ignore")])
    with transaction.atomic():
        delay_environ(result_for(sent))
    get_dispatcher().run_pending()
    # The runner honoured Celery's Ignore: the run ended, the job's later steps never ran.
    assert not PendingRun.objects.exists()
    assert not StepLog.objects.exists()
