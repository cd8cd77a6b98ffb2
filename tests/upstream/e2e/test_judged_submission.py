"""A real submission judged end to end inside upstream OIOIOI, its results returned through the
queue.

Upstream's own fixtures give the contest, the problem package (``sum``, six tests and a checker)
and its problem instance; test_user submits sinolpack's ``sum-various-results.cpp`` through the
submit view, as upstream's ``oioioi.sinolpack.tests.TestJudging`` does. The evaluation runs in a
real Celery worker whose sioworkers backend is ``QueueBackend``: each job group (compilation with
g++, then the tests) runs in that worker, as upstream's ``LocalBackend`` would run it, and its
result goes to the queue, to the consumer, and back to the worker through the outbox. The
submission must end with what upstream's test asserts for the same submission under its own
eager flow: 4 tests OK, 1 WA, 1 RE, status INI_OK, score 34.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.urls import reverse
from oioioi.contests.models import Contest, ProblemInstance, Submission, UserResultForContest
from oioioi.contests.scores import IntegerScore
from oioioi.programs.models import TestReport
from results_e2e.conftest import TREE, wait_until

from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.models import PendingRun, ReceivedResult

pytestmark = pytest.mark.django_db(transaction=True)

#: The fixtures of upstream's ``TestJudging`` (oioioi/sinolpack/tests.py).
FIXTURES = ["test_users", "test_contest", "test_full_package", "test_problem_instance"]
SOLUTION = TREE / "oioioi" / "sinolpack" / "files" / "sum-various-results.cpp"


def test_a_submission_is_judged_through_the_queue(
    start_worker, start_consumer, client, broker, run_settings
):
    # Given upstream's contest and problem, a Celery worker judging with QueueBackend, a consumer
    call_command("loaddata", *FIXTURES, verbosity=0)
    worker = start_worker(backend="oioioi.workers.backends.QueueBackend")
    consumer = start_consumer()

    # When test_user submits a solution through the submit view
    assert client.login(username="test_user")
    contest = Contest.objects.get()
    problem_instance = ProblemInstance.objects.get()
    with SOLUTION.open("rb") as source:
        response = client.post(
            reverse("submit", kwargs={"contest_id": contest.id}),
            {"problem_instance_id": problem_instance.id, "file": source},
        )
    assert response.status_code == 302
    submission = Submission.objects.get()

    # Then it is judged, every job group's result having come back through the queue
    wait_until(
        lambda: (
            not QueuedJob.objects.filter(submission=submission).exists()
            and not PendingRun.objects.exists()
        ),
        timeout=180,
        what="the submission to be judged",
    )
    received = ReceivedResult.objects.filter(submission_id=submission.id)
    assert received.count() >= 2, "the compilation and the tests each return through the queue"
    assert set(received.values_list("outcome", flat=True)) == {"resumed"}
    assert all(key.startswith("GROUP_") for key in received.values_list("key", flat=True))
    assert worker.log.count("oioioi.workers.tasks.run_pending_job") >= 2 * received.count()

    # And it has what upstream's own flow gives it (oioioi.sinolpack.tests.TestJudging)
    assert TestReport.objects.count() == 6
    assert TestReport.objects.filter(status="OK").count() == 4
    assert TestReport.objects.filter(status="WA").count() == 1
    assert TestReport.objects.filter(status="RE").count() == 1
    submission.refresh_from_db()
    assert submission.status == "INI_OK"
    assert submission.score == IntegerScore(34)
    assert UserResultForContest.objects.get().score == IntegerScore(34)

    broker.wait_depth(run_settings.queue, 0)
    assert broker.depth(run_settings.dead_letter_queue) == 0
    assert consumer.stop() == 0
