"""The set-based forms of ``delay_environ`` and ``evalmgr_job`` (``oioioi.evalmgr.batch``).

Each test says what the one-job functions would have done and checks that a batch did the same,
through the real ORM; two more pin down that a batch costs a few statements, not a few per job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from consumer.decode import decode
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers import store
from oioioi.workers.claims import ClaimedRun
from oioioi.workers.dispatch import get_dispatcher
from oioioi.workers.models import PendingRun
from oioioi.workers.resume import delay_environs
from oioioi.workers.runner import LeaseLost, run_one
from tests.conftest import result_for
from tests.recipeapp.models import StepLog
from tests.recipeapp.recipes import new_job_environ

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.both_databases]

RECORD = "tests.recipeapp.recipes.record"


def steps(job_id: str) -> list[str]:
    return list(StepLog.objects.filter(job_id=job_id).order_by("pk").values_list("step", flat=True))


def write(*envs: dict[str, Any]) -> list[str]:
    """The consumer's write of one batch, then the recipes it runs after the ack."""
    results = [decode(json.dumps(env).encode(), f"m-{env['group_id']}") for env in envs]
    outcomes = store.write(results)
    return outcomes


# --- delay_environs ------------------------------------------------------------------------------


def test_each_environ_gets_what_delay_environ_would_give_it(waiting_job):
    # Given four waiting jobs: one cancelled meanwhile, one whose result was applied already
    a, b, c, d = (waiting_job(submission_id=i) for i in range(4))
    QueuedJob.objects.filter(job_id=c["job_id"]).update(state="CANCELLED")
    SavedEnviron.objects.filter(id=d["saved_environ_id"]).delete()
    ra, rb, rc, rd = (result_for(sent) for sent in (a, b, c, d))
    rb_again = dict(rb, group_id="GROUP_again")
    # When their results (b's twice) are delayed as one list
    with transaction.atomic():
        handles = delay_environs([dict(ra), dict(rb), dict(rb_again), dict(rc), dict(rd)])
    # Then a and b are queued with a run each, the copy of b, c and d are ignored
    assert [h is not None for h in handles] == [True, True, False, False, False]
    for sent, handle in ((a, handles[0]), (b, handles[1])):
        job = QueuedJob.objects.get(job_id=sent["job_id"])
        assert (job.state, job.celery_task_id) == ("QUEUED", handle)
        run = PendingRun.objects.get(job_id=sent["job_id"])
        assert handle == f"run-{run.pk}"
        environ = json.loads(run.environ)
        assert environ["workers_jobs.results"] == ra["workers_jobs.results"]
        assert [phase[0] for phase in environ["recipe"]] == ["record"]
        assert "saved_environ_id" not in environ and "restore_environ_func" not in environ
    assert not QueuedJob.objects.filter(job_id=c["job_id"]).exists()
    assert QueuedJob.objects.get(job_id=d["job_id"]).state == "WAITING"
    assert PendingRun.objects.count() == 2
    assert not SavedEnviron.objects.exists()
    # And each recipe runs once
    get_dispatcher().run_pending()
    assert steps(a["job_id"]) == steps(b["job_id"]) == ["after-results"]


def test_a_new_job_is_created_queued_and_a_changed_submission_is_set():
    fresh = new_job_environ(submission_id=5)
    known = new_job_environ(submission_id=7)
    QueuedJob.objects.create(job_id=known["job_id"], state="WAITING", submission_id=6)
    with transaction.atomic():
        handles = delay_environs([fresh, known])
    assert all(handles)
    assert dict(QueuedJob.objects.values_list("job_id", "submission_id")) == {
        fresh["job_id"]: 5,
        known["job_id"]: 7,
    }
    assert set(QueuedJob.objects.values_list("state", flat=True)) == {"QUEUED"}


def test_two_environs_of_one_job_are_applied_one_after_the_other():
    env = new_job_environ(submission_id=1)
    with transaction.atomic():
        first, second = delay_environs([dict(env), dict(env)])
    # As two delay_environ calls: two runs, and the job names the later one.
    assert first and second and first != second
    assert QueuedJob.objects.get().celery_task_id == second
    assert PendingRun.objects.count() == 2


def test_a_restore_that_fails_fails_the_whole_list(waiting_job):
    good, bad = waiting_job(submission_id=1), waiting_job(submission_id=2)
    saved = SavedEnviron.objects.get(id=bad["saved_environ_id"])
    environ = saved.load_environ()
    environ["restore_environ_func"] = "tests.recipeapp.recipes.failing_restore"
    SavedEnviron.objects.filter(id=saved.id).update(environ=json.dumps(environ))
    with pytest.raises(ValueError, match="restore failed"), transaction.atomic():
        delay_environs([result_for(good), result_for(bad)])
    # Rolled back as one: both jobs still wait.
    assert SavedEnviron.objects.count() == 2
    assert set(QueuedJob.objects.values_list("state", flat=True)) == {"WAITING"}


def test_a_dispatcher_that_knows_only_dispatch_gets_one_call_per_environ(waiting_job):
    jobs = [waiting_job(submission_id=i) for i in (1, 2)]
    only = override_settings(EVALMGR_DISPATCHER="tests.recipeapp.recipes.DispatchOnly")
    envs = [dict(result_for(sent), submission_id=i + 1) for i, sent in enumerate(jobs)]
    with only, transaction.atomic():
        handles = delay_environs(envs)
    assert handles == ["t-1", "t-2"]
    assert sorted(QueuedJob.objects.values_list("state", "celery_task_id")) == [
        ("QUEUED", "t-1"),
        ("QUEUED", "t-2"),
    ]


def test_the_batched_write_costs_the_same_few_statements_for_any_batch(waiting_job):
    def statements(count: int) -> int:
        envs = [result_for(waiting_job()) for _ in range(count)]
        with CaptureQueriesContext(connection) as queries:
            assert write(*envs) == ["committed"] * count
        return len(queries)

    # One-by-one writes would cost six or more statements per result.
    assert statements(2) == statements(40) <= 12


# --- run_recipes ---------------------------------------------------------------------------------


def test_recipes_of_different_lengths_run_phase_by_phase(waiting_job):
    long = waiting_job(
        after=[("record", RECORD, {"step": "one"}), ("record", RECORD, {"step": "two"})]
    )
    short = waiting_job()
    write(result_for(long), result_for(short))
    assert get_dispatcher().run_pending() == 2
    assert steps(long["job_id"]) == ["one", "two", "after-results"]
    assert steps(short["job_id"]) == ["after-results"]
    assert not QueuedJob.objects.exists() and not PendingRun.objects.exists()


def test_running_a_batch_costs_a_few_statements_per_round_not_per_job(waiting_job):
    def statements(count: int) -> int:
        # A recipe that does nothing on the database itself: what is counted is the runner's.
        after = [("noop", "oioioi.evalmgr.tasks._placeholder")]
        envs = [result_for(waiting_job(after=after)) for _ in range(count)]
        write(*envs)
        StepLog.objects.all().delete()
        with CaptureQueriesContext(connection) as queries:
            assert get_dispatcher().run_pending(sweep=False) == count
        assert StepLog.objects.count() == count  # the last phase, "record", of each
        return len(queries) - count  # less one StepLog insert per job

    # evalmgr_job alone costs seven statements a job.
    assert statements(2) == statements(30) <= 20


def test_a_phase_that_raises_is_charged_to_its_job_alone(waiting_job):
    bad = waiting_job(after=[("boom", "tests.recipeapp.recipes.fail")])
    good = [waiting_job(after=[("record", RECORD, {"step": "one"})]) for _ in range(2)]
    write(result_for(bad), *(result_for(sent) for sent in good))
    get_dispatcher().run_pending()
    # The round in which "boom" raised was rolled back and its jobs ran alone: each committed
    # step is there once.
    for sent in good:
        assert steps(sent["job_id"]) == ["one", "after-results"]
    # The bad job's error handler (remove_queuedjob_on_error) forgot it.
    assert steps(bad["job_id"]) == []
    assert not QueuedJob.objects.exists() and not PendingRun.objects.exists()


def test_a_job_cancelled_before_its_run_ends_without_running_a_phase(waiting_job):
    cancelled, going = waiting_job(), waiting_job()
    write(result_for(cancelled), result_for(going))
    QueuedJob.objects.filter(job_id=cancelled["job_id"]).update(state="CANCELLED")
    get_dispatcher().run_pending()
    assert steps(cancelled["job_id"]) == []
    assert steps(going["job_id"]) == ["after-results"]
    assert not QueuedJob.objects.exists() and not PendingRun.objects.exists()


def test_an_error_from_the_workers_runs_the_error_handlers_of_that_job_only(waiting_job):
    failed, fine = waiting_job(), waiting_job()
    error = result_for(failed, "validation_error_env.json")
    error.pop("workers_jobs.results", None)
    write(error, result_for(fine))
    get_dispatcher().run_pending()
    assert steps(failed["job_id"]) == []
    assert steps(fine["job_id"]) == ["after-results"]
    assert not QueuedJob.objects.exists() and not PendingRun.objects.exists()


def test_a_phase_may_transfer_its_job_again(waiting_job):
    twice = waiting_job(after=[("again", "tests.recipeapp.recipes.transfer_to_workers")])
    once = waiting_job()
    write(result_for(twice), result_for(once))
    get_dispatcher().run_pending()
    # Parked again, waiting for its second result, with the rest of its recipe saved.
    job = QueuedJob.objects.get()
    assert (job.job_id, job.state) == (twice["job_id"], "WAITING")
    saved = SavedEnviron.objects.get(queued_job_id=twice["job_id"])
    assert [phase[0] for phase in saved.load_environ()["recipe"]] == ["record"]
    assert not PendingRun.objects.exists()
    sent = saved.load_environ()
    sent["saved_environ_id"] = saved.id
    for field in ("recipe", "error_handlers", "restore_environ_func"):
        sent.pop(field)
    write(result_for(sent))
    get_dispatcher().run_pending()
    assert steps(twice["job_id"]) == steps(once["job_id"]) == ["after-results"]
    assert not QueuedJob.objects.exists() and not SavedEnviron.objects.exists()


@pytest.mark.parametrize("error", ["bug", "database", "ignore"])
@pytest.mark.parametrize("alone", [False, True], ids=["in-a-batch", "on-its-own"])
def test_a_failed_transfer_forgets_its_save_and_ends_the_job_as_evalmgr_job_does(
    waiting_job, error: str, alone: bool
):
    failing = waiting_job(
        after=[("again", "tests.recipeapp.recipes.transfer_failing", {"error": error})]
    )
    other = waiting_job()
    if alone:
        # A run nobody holds: a sweep takes it and runs it on its own.
        with transaction.atomic():
            delay_environs([result_for(failing)])
        get_dispatcher().run_pending()
        write(result_for(other))
    else:
        write(result_for(failing), result_for(other))
    get_dispatcher().run_pending()
    # The transfer's save is forgotten and the run is over; as in evalmgr_job, an Ignore stops
    # the job silently, and any other error runs its error handlers (remove_queuedjob_on_error),
    # an error of the database too: nothing would retry a transfer whose run has ended.
    assert not SavedEnviron.objects.exists() and not PendingRun.objects.exists()
    left = list(QueuedJob.objects.values_list("job_id", "state"))
    assert left == ([(failing["job_id"], "WAITING")] if error == "ignore" else [])
    assert steps(other["job_id"]) == ["after-results"]


def test_a_run_taken_over_between_rounds_is_left_to_its_new_runner(waiting_job):
    kept = waiting_job(after=[("record", RECORD, {"step": "one"})])
    taken = waiting_job(after=[("record", RECORD, {"step": "one"})])
    SavedEnviron.objects.filter(queued_job_id=kept["job_id"]).update(
        environ=json.dumps(
            {
                **SavedEnviron.objects.get(queued_job_id=kept["job_id"]).load_environ(),
                "recipe": [
                    ["take", "tests.recipeapp.recipes.take_over", {"job_id": taken["job_id"]}],
                    ["record", RECORD, {"step": "after-results"}],
                ],
            }
        )
    )
    write(result_for(kept), result_for(taken))
    get_dispatcher().run_pending()
    # In the first round the other run was taken over: it got no second phase from us.
    assert steps(kept["job_id"]) == ["after-results"]
    assert steps(taken["job_id"]) == ["one"]
    assert PendingRun.objects.get().claimed_by == "elsewhere"


def test_a_run_on_its_own_whose_claim_is_someone_elses_commits_nothing(waiting_job):
    sent = waiting_job()
    with transaction.atomic():
        delay_environs([result_for(sent)])
    run = PendingRun.objects.get()
    with pytest.raises(LeaseLost):
        run_one(json.loads(run.environ), ClaimedRun(run.pk, "not-this-runner"))
    assert steps(sent["job_id"]) == []
    assert PendingRun.objects.get().environ == run.environ


def test_a_database_error_mid_batch_leaves_each_run_to_resume_from_its_checkpoint(
    waiting_job, tmp_path: Path
):
    flag = tmp_path / "lose-the-database"
    flag.touch()
    flaky = waiting_job(
        after=[
            ("record", RECORD, {"step": "one"}),
            ("flaky", "tests.recipeapp.recipes.fail_once", {"flag": str(flag)}),
        ]
    )
    steady = waiting_job(after=[("record", RECORD, {"step": "one"})])
    write(result_for(flaky), result_for(steady))
    # The second round fails on the database: the first one's steps stay committed.
    with pytest.raises(OperationalError):
        get_dispatcher().run_pending()
    assert steps(flaky["job_id"]) == steps(steady["job_id"]) == ["one"]
    assert list(PendingRun.objects.values_list("attempts", flat=True)) == [1, 1]
    # The next call runs each on its own from its checkpoint; no step runs twice.
    assert get_dispatcher().run_pending() == 2
    assert steps(flaky["job_id"]) == steps(steady["job_id"]) == ["one", "after-results"]
    assert not QueuedJob.objects.exists() and not PendingRun.objects.exists()
