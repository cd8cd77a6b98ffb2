"""The recipes run by a runner process of the consumer's own (oioioi.workers.runner_process).

Through the real command, a real broker and a real database: the runner is a second process, it
runs every resumed job's recipe exactly once, a runner killed midway costs nothing but time, and
a consumer stopped by SIGTERM lets its runner finish first.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.models import PendingRun, ReceivedResult
from tests.conftest import result_for
from tests.helpers import job_done, wait_until
from tests.recipeapp.models import StepLog

pytestmark = pytest.mark.django_db(transaction=True)

PROCESS = {"EVALMGR_DISPATCHER": "oioioi.workers.runner_process.ProcessDispatcher"}
PID = ("pid", "tests.recipeapp.recipes.record_pid")


def runner_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"Started the recipe runner \(pid (\d+)\)", log)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not alive either.
    status = Path(f"/proc/{pid}/status").read_text()
    return "\nState:\tZ" not in status


def test_recipes_run_once_each_in_the_runner_not_the_consumer(broker, start_consumer, waiting_job):
    sent = [waiting_job(submission_id=100 + i, after=[PID]) for i in range(30)]
    consumer = start_consumer(**PROCESS)
    [runner] = runner_pids(consumer.log)
    assert runner != consumer.proc.pid
    for i, env in enumerate(sent):
        broker.publish_env(result_for(env), message_id=f"r{i}")
    for env in sent:
        wait_until(job_done(env["job_id"]), timeout=60, what=f"job {env['job_id']}")
    for env in sent:
        steps = StepLog.objects.filter(job_id=env["job_id"])
        assert sorted(steps.values_list("step", flat=True)) == ["after-results", "pid"]
        assert steps.get(step="pid").detail == str(runner)
    assert ReceivedResult.objects.filter(outcome="resumed").count() == 30
    assert not PendingRun.objects.exists()
    broker.wait_depth(broker.settings.queue, 0)
    assert consumer.stop() == 0
    assert not alive(runner)


def test_a_runner_killed_in_a_recipe_is_replaced_and_the_run_taken_over_once(
    broker, start_consumer, waiting_job, tmp_path: Path
):
    flag = tmp_path / "crash"
    flag.touch()
    crash = ("crash", "tests.recipeapp.recipes.crash_if_flagged", {"flag": str(flag)})
    sent = waiting_job(
        after=[("before", "tests.recipeapp.recipes.record", {"step": "before"}), crash]
    )
    # Given a consumer whose runner dies in the job's recipe (a short lease: the run is taken
    # over once it has run out)
    consumer = start_consumer(EVALMGR_RUN_LEASE_SECONDS="2", **PROCESS)
    [first] = runner_pids(consumer.log)
    broker.publish_env(result_for(sent), message_id="kills-its-runner")
    consumer.wait_for_log("The recipe runner exited (code 137)")
    # Then the consumer lives on, with a new runner, and the message was acked once committed
    assert consumer.alive()
    wait_until(lambda: len(runner_pids(consumer.log)) == 2, what="a second runner")
    assert not alive(first)
    broker.wait_depth(broker.settings.queue, 0)
    assert PendingRun.objects.filter(job_id=sent["job_id"]).exists()
    # When the fault is gone and the claim has run out, the sweep hands the run to the new
    # runner, which finishes it from its last committed phase: every phase exactly once
    flag.unlink()
    wait_until(job_done(sent["job_id"]), timeout=40, what="the job after its runner died")
    steps = sorted(StepLog.objects.filter(job_id=sent["job_id"]).values_list("step", flat=True))
    assert steps == ["after-results", "before"]
    assert not QueuedJob.objects.filter(job_id=sent["job_id"]).exists()
    assert consumer.stop() == 0


def test_sigterm_lets_the_runner_finish_its_recipe_then_both_stop(
    broker, start_consumer, waiting_job
):
    slow = ("slow", "tests.recipeapp.recipes.slow", {"seconds": 2.0})
    sent = waiting_job(after=[slow])
    consumer = start_consumer(**PROCESS)
    [runner] = runner_pids(consumer.log)
    broker.publish_env(result_for(sent), message_id="slow")
    wait_until(
        lambda: ReceivedResult.objects.filter(key="slow").exists(), what="the result committed"
    )
    # A terminal's Ctrl-C or a supervisor stopping the group signals both processes
    os.kill(runner, signal.SIGINT)
    consumer.signal(signal.SIGTERM)
    assert consumer.proc.wait(60) == 0
    assert not alive(runner)
    # The recipe in hand was finished, not cut
    assert job_done(sent["job_id"])()
    assert not PendingRun.objects.exists()


def test_runners_that_die_starting_leave_the_recipes_to_the_consumer(
    monkeypatch, settings, caplog, waiting_job
):
    from django.db import transaction

    from oioioi.workers.dispatch import get_dispatcher
    from oioioi.workers.resume import delay_environs

    sent = waiting_job()
    settings.EVALMGR_DISPATCHER = PROCESS["EVALMGR_DISPATCHER"]
    # A runner that cannot set Django up (here: settings it cannot import) dies as it starts
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.no_such_settings")
    with transaction.atomic():
        delay_environs([result_for(sent)], run_here=True)
    with caplog.at_level("WARNING", logger="oioioi.workers.runner_process"):
        get_dispatcher().run_pending(sweep=False)
    # Three runners die starting; then the consumer runs the recipes itself, and the job is done
    assert caplog.text.count("The recipe runner exited") == 3
    assert "running the recipes in this process from now on" in caplog.text
    assert job_done(sent["job_id"])()
    assert not PendingRun.objects.exists()
