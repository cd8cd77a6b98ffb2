"""The batched write and the batched claim of runs, through the real ORM.

``store.write`` inserts a batch's inbox rows with one ``INSERT ... ON CONFLICT DO NOTHING
RETURNING`` and ``LocalDispatcher.run_pending`` claims the runs of a batch with one statement;
these tests pin down that the outcomes are the ones the row-by-row versions gave.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings

from consumer.decode import Result, decode
from consumer.errors import MismatchedEnviron, NoSavedEnviron, RejectedEnviron
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers import store
from oioioi.workers.dispatch import get_dispatcher
from oioioi.workers.models import PendingRun, ReceivedResult
from tests.conftest import result_for
from tests.recipeapp.models import StepLog

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.both_databases]


def as_result(env: dict[str, Any], message_id: str) -> Result:
    return decode(json.dumps(env).encode(), message_id)


@pytest.fixture(params=["bulk", "row-by-row"])
def inbox_path(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the write takes: one ON CONFLICT statement, or (on databases without it, such
    as MySQL) one savepoint per inbox row. Their outcomes must be the same."""
    if request.param == "row-by-row":
        monkeypatch.setattr(store, "_bulk_inbox", lambda: False)
    return str(request.param)


def test_a_batch_resumes_every_job_and_runs_every_recipe_once(waiting_job, inbox_path):
    # Given ten waiting jobs and a result for each
    jobs = [waiting_job(submission_id=i) for i in range(10)]
    results = [as_result(result_for(sent), f"m{i}") for i, sent in enumerate(jobs)]
    # When they are written as one batch and the recipes run
    assert store.write(results) == ["committed"] * 10
    assert PendingRun.objects.count() == 10
    assert get_dispatcher().run_pending() == 10
    # Then each job ran its recipe once and is gone, and the inbox holds one row per message
    for sent in jobs:
        assert StepLog.objects.filter(job_id=sent["job_id"]).count() == 1
    assert not QueuedJob.objects.exists() and not SavedEnviron.objects.exists()
    assert not PendingRun.objects.exists()
    rows = dict(ReceivedResult.objects.values_list("key", "outcome"))
    assert rows == {f"m{i}": "resumed" for i in range(10)}
    assert ReceivedResult.objects.get(key="m3").job_id == jobs[3]["job_id"]


def test_the_consumer_runs_what_it_wrote_right_after_the_ack(waiting_job, inbox_path):
    # Given results written by the consumer's write, on either inbox path
    jobs = [waiting_job(submission_id=i) for i in range(3)]
    store.write([as_result(result_for(sent), f"m{i}") for i, sent in enumerate(jobs)])
    # When the consumer runs what it resumed (after_ack: no sweep for others' runs)
    store.after_ack()
    # Then every recipe ran at once, not at the next sweep
    for sent in jobs:
        assert StepLog.objects.filter(job_id=sent["job_id"]).count() == 1
    assert not PendingRun.objects.exists()


def test_duplicates_within_and_across_batches_have_no_second_effect(waiting_job, inbox_path):
    first, second = waiting_job(submission_id=1), waiting_job(submission_id=2)
    a, b = as_result(result_for(first), "a"), as_result(result_for(second), "b")
    # The same message twice in one batch: the first copy counts.
    assert store.write([a, a, b]) == ["committed", "duplicate", "committed"]
    # Redelivered later, in another batch.
    assert store.write([b, a]) == ["duplicate", "duplicate"]
    assert ReceivedResult.objects.count() == 2
    assert PendingRun.objects.count() == 2


def test_a_result_for_a_job_already_resumed_is_recorded_as_ignored(waiting_job, inbox_path):
    sent = waiting_job()
    result = result_for(sent)
    # sioworkersd sends the same group again under another message id.
    outcomes = store.write([as_result(result, "first"), as_result(result, "again")])
    assert outcomes == ["committed", "committed"]
    assert dict(ReceivedResult.objects.values_list("key", "outcome")) == {
        "first": "resumed",
        "again": "ignored",
    }
    assert PendingRun.objects.count() == 1


def test_an_environ_the_domain_refuses_fails_the_batch_before_anything_is_written(
    waiting_job, inbox_path
):
    good = as_result(result_for(waiting_job()), "good")
    bad = as_result({"workers_jobs.results": {}, "job_id": "j", "saved_environ_id": "7"}, "bad")
    with pytest.raises(RejectedEnviron):
        store.write([good, bad])
    assert not ReceivedResult.objects.exists()
    assert not PendingRun.objects.exists()
    # Written alone, the good one goes through (what the consumer's fallback does).
    assert store.write([good]) == ["committed"]


def _left_waiting(*jobs: dict[str, Any]) -> bool:
    """Each job is still WAITING with its saved environ as the transfer saved it."""
    for sent in jobs:
        job = QueuedJob.objects.get(job_id=sent["job_id"])
        saved = SavedEnviron.objects.get(id=sent["saved_environ_id"])
        if job.state != "WAITING" or saved.queued_job_id != job.job_id:
            return False
    return True


def test_a_mismatched_result_naming_another_jobs_saved_environ_is_refused_leaving_both_waiting(
    waiting_job, inbox_path
):
    # Given three waiting jobs, and a result for the first that names the second's saved environ
    named, other, third = (waiting_job(submission_id=i) for i in range(3))
    bad_env = result_for(named)
    bad_env["saved_environ_id"] = other["saved_environ_id"]
    bad = as_result(bad_env, "bad")
    good = as_result(result_for(third), "good")
    # When it is written in a batch with a good result, the batch fails before anything is
    # written (the consumer then writes each message alone)
    with pytest.raises(MismatchedEnviron) as refused:
        store.write([good, bad])
    assert refused.value.reason == "mismatch"
    assert other["job_id"] in str(refused.value) and named["job_id"] in str(refused.value)
    assert not ReceivedResult.objects.exists() and not PendingRun.objects.exists()
    assert _left_waiting(named, other, third)
    # Then written alone, the good one commits and the bad one is refused again
    assert store.write([good]) == ["committed"]
    with pytest.raises(MismatchedEnviron):
        store.write([bad])
    assert list(ReceivedResult.objects.values_list("key", flat=True)) == ["good"]
    assert list(PendingRun.objects.values_list("job_id", flat=True)) == [third["job_id"]]
    # And both jobs it named are untouched: their own results resume them
    assert _left_waiting(named, other)
    outcomes = store.write([as_result(result_for(s), s["job_id"]) for s in (named, other)])
    assert outcomes == ["committed", "committed"]
    assert ReceivedResult.objects.filter(outcome="resumed").count() == 3
    assert not SavedEnviron.objects.exists()
    # A redelivery of the good one, whose saved environ is gone now, is still a duplicate
    assert store.write([good]) == ["duplicate"]


def test_a_result_with_no_saved_environ_id_is_refused_and_its_job_left_waiting(
    waiting_job, inbox_path
):
    sent = waiting_job()
    env = result_for(sent)
    env.pop("saved_environ_id")
    good = as_result(result_for(waiting_job(submission_id=2)), "good")
    for bad in (as_result(env, "bad"), as_result({**env, "saved_environ_id": None}, "null")):
        with pytest.raises(NoSavedEnviron) as refused:
            store.write([good, bad])
        assert refused.value.reason == "no-saved-environ"
    assert not ReceivedResult.objects.exists() and not PendingRun.objects.exists()
    assert _left_waiting(sent)


def test_a_result_whose_saved_environ_is_gone_is_ignored_not_refused(waiting_job, inbox_path):
    # Given a result never received before, for a job deleted meanwhile (its saved environ
    # with it): upstream's "already resumed, ignoring", not the message's fault
    sent = waiting_job()
    QueuedJob.objects.filter(job_id=sent["job_id"]).delete()
    assert not SavedEnviron.objects.exists()
    assert store.write([as_result(result_for(sent), "late")]) == ["committed"]
    assert ReceivedResult.objects.get().outcome == "ignored"
    assert not PendingRun.objects.exists()


def test_a_result_is_handed_to_its_run_as_the_legacy_receiver_would_hand_it_on(
    waiting_job, inbox_path
):
    # Given a result laid out by hand (tabs and newlines between its tokens) with text that SQL
    # and COPY would have to quote (backslashes, a tab, \N, non-ASCII)
    sent = waiting_job()
    result = result_for(sent)
    result["compiler_output"] = "a\\b\tc\r\n\\N \\\\ é \u2028 😀 \x00"
    body = json.dumps(result, indent="\t", ensure_ascii=False).encode()
    saved = json.loads(SavedEnviron.objects.get(id=sent["saved_environ_id"]).environ)
    # When it is written
    assert store.write([decode(body, "m")]) == ["committed"]
    # Then its run holds what upstream's receiver and delay_environ would have handed on: the
    # saved environ updated by restore_job with the result, less the sent jobs
    handed_on = json.loads(body.decode())
    for field in ("workers_jobs", "workers_jobs.extra_args", "saved_environ_id"):
        handed_on.pop(field, None)
    saved.pop("restore_environ_func")
    saved.update(handed_on)
    assert json.loads(PendingRun.objects.get().environ) == saved
    # And its recipe runs on it
    store.after_ack()
    assert StepLog.objects.get(job_id=sent["job_id"]).detail == json.dumps(["job0", "job1"])


def test_a_restore_function_that_reads_values_is_given_decoded_environs(waiting_job, inbox_path):
    sent = waiting_job()
    saved = SavedEnviron.objects.get(id=sent["saved_environ_id"])
    environ = saved.load_environ()
    environ["restore_environ_func"] = "tests.recipeapp.recipes.counting_restore"
    environ["reports"] = ["earlier"]
    SavedEnviron.objects.filter(id=saved.id).update(environ=json.dumps(environ))
    assert store.write([as_result(result_for(sent), "m")]) == ["committed"]
    resumed = json.loads(PendingRun.objects.get().environ)
    assert resumed["result_count"] == 2 and resumed["reports"] == ["earlier", "job0", "job1"]


def test_a_batch_claim_whose_lease_ran_low_is_renewed_before_its_run(waiting_job):
    jobs = [waiting_job(submission_id=i) for i in range(3)]
    store.write([as_result(result_for(sent), f"m{i}") for i, sent in enumerate(jobs)])
    # A lease of zero makes every batch claim stale by the time its run starts: each is renewed
    # under the same token (no new attempt) and still runs once.
    with override_settings(EVALMGR_RUN_LEASE_SECONDS=0):
        assert get_dispatcher().run_pending() == 3
    assert StepLog.objects.count() == 3
    assert not PendingRun.objects.exists()


def test_runs_claimed_by_someone_else_are_left_to_them(waiting_job):
    jobs = [waiting_job(submission_id=i) for i in range(2)]
    store.write([as_result(result_for(sent), f"m{i}") for i, sent in enumerate(jobs)])
    taken = PendingRun.objects.get(job_id=jobs[0]["job_id"])
    PendingRun.objects.filter(pk=taken.pk).update(
        claimed_by="elsewhere", claimed_until="2999-01-01T00:00:00Z"
    )
    assert get_dispatcher().run_pending() == 1
    assert PendingRun.objects.get().pk == taken.pk
    assert StepLog.objects.filter(job_id=jobs[1]["job_id"]).count() == 1


@pytest.mark.postgres
def test_two_writers_with_overlapping_batches_apply_each_message_once(waiting_job):
    # Given the same 30 results in two batches, in opposite orders
    jobs = [waiting_job(submission_id=i) for i in range(30)]
    results = [as_result(result_for(sent), f"m{i}") for i, sent in enumerate(jobs)]
    outcomes: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(name: str, batch: list[Result]) -> None:
        try:
            start.wait()
            outcomes[name] = store.write(batch)
        except BaseException as e:
            errors.append(e)
        finally:
            connection.close()

    # When two writers (two connections) write them at the same time
    threads = [
        threading.Thread(target=writer, args=("forward", results)),
        threading.Thread(target=writer, args=("backward", list(reversed(results)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Then neither failed (no deadlock), and each message was applied by exactly one of them
    assert not errors
    forward = dict(zip([r.key for r in results], outcomes["forward"], strict=True))
    backward = dict(zip([r.key for r in reversed(results)], outcomes["backward"], strict=True))
    for key in forward:
        assert sorted([forward[key], backward[key]]) == ["committed", "duplicate"]
    assert ReceivedResult.objects.filter(outcome="resumed").count() == 30
    assert PendingRun.objects.count() == 30
