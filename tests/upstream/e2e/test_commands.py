"""The return path's commands inside upstream OIOIOI, as an operator runs them after the install:
the HTTP shim for unmodified sioworkersd, ``results_status``, ``results_deadletters``,
``run_pending_jobs``, and upstream's receiver kept as ``legacy_receive_from_workers`` (the way
back)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from typing import Any

import pytest
from django.db import transaction
from results_e2e.conftest import (
    TREE,
    job_finished,
    sent_group,
    sioworkersd_result,
    steps,
    wait_until,
)

from oioioi.evalmgr.models import QueuedJob
from oioioi.workers.models import PendingRun, ReceivedResult
from oioioi.workers.resume import delay_environs

pytestmark = pytest.mark.django_db(transaction=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post_like_sioworkersd(port: int, env: dict[str, Any]) -> int:
    """POST ``env`` as sioworkersd returns it (multipart form, field ``data``); the status."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="data"\r\n\r\n'
        f"{json.dumps(env)}\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/",
        data=body,
        headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "User-Agent": "sioworkersd",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def manage(process_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=TREE,
        env=process_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_shim_takes_sioworkersds_post_and_the_job_finishes(
    start_worker, start_consumer, park_job, broker
):
    # Given a parked job, its Celery worker, a consumer and the shim where the receiver was
    worker = start_worker()
    start_consumer()
    port = free_port()
    shim = start_consumer("--http-shim", "--addr", "127.0.0.1", "--port", str(port), ready=False)
    shim.wait_for_log("HTTP shim listening")
    env = park_job()
    result = sioworkersd_result(sent_group(env["job_id"]))
    # When sioworkersd POSTs the result as it does today
    assert post_like_sioworkersd(port, result) == 200
    # Then the job resumes through the queue and finishes in the worker
    wait_until(job_finished(env["job_id"]), what="the job to finish")
    assert steps(env["job_id"]) == [("after-results", worker.pid)]
    assert ReceivedResult.objects.get().key == result["group_id"]


def test_upstreams_receiver_is_kept_as_the_way_back(start_worker, park_job, process_env):
    # Given upstream's own receiver, as the installer kept it
    worker = start_worker()
    port = free_port()
    from results_e2e.conftest import Process

    legacy = Process(
        "legacy-receiver",
        [sys.executable, "-m", "django", "legacy_receive_from_workers"],
        {**process_env, "RESULTS_E2E_LISTEN_PORT": str(port)},
    )
    try:
        wait_until(lambda: _listening(port), what="the legacy receiver to listen")
        env = park_job()
        result = sioworkersd_result(sent_group(env["job_id"]))
        # When sioworkersd POSTs to it
        assert post_like_sioworkersd(port, result) == 200
        # Then upstream's delay_environ resumes the job and Celery finishes it, as before the
        # install; the return path's tables are not involved
        wait_until(job_finished(env["job_id"]), what="the job to finish")
        assert steps(env["job_id"]) == [("after-results", worker.pid)]
        assert not ReceivedResult.objects.exists()
    finally:
        legacy.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_operator_commands_see_and_settle_what_is_there(
    start_worker, start_consumer, park_job, broker, process_env, run_settings
):
    # Given a dead letter (a body that is not JSON) and a resumed job whose run nobody has
    # handed to Celery (its consumer died before the relay)
    consumer = start_consumer()
    broker.publish_raw(b"not json", message_id="poison-1")
    broker.wait_depth(run_settings.dead_letter_queue, 1)
    # Stopped, as its consumer died: a running one would find the run on its next sweep
    # (every few seconds) and relay it before run_pending_jobs does.
    assert consumer.stop() == 0
    worker = start_worker()
    env = park_job()
    result = sioworkersd_result(sent_group(env["job_id"]))
    with transaction.atomic():
        delay_environs([result])
    assert QueuedJob.objects.get(job_id=env["job_id"]).state == "QUEUED"
    assert PendingRun.objects.filter(job_id=env["job_id"], claimed_by=None).exists()

    # results_status reports both
    status = manage(process_env, "results_status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["dead_letters"]["count"] == 1
    assert report["dead_letters"]["by_reason"] == {"undecodable": 1}
    assert report["pending_runs"]["count"] == 1
    assert report["jobs"]["by_state"]["QUEUED"] == 1

    # results_deadletters lists the dead letter and discards it
    listing = manage(process_env, "results_deadletters", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    (letter,) = json.loads(listing.stdout)
    assert letter["message_id"] == "poison-1"
    discard = manage(process_env, "results_deadletters", "discard", letter["id"], "--yes")
    assert discard.returncode == 0, discard.stderr
    assert broker.depth(run_settings.dead_letter_queue) == 0

    # run_pending_jobs hands the run to Celery, whose worker finishes the job
    sweep = manage(process_env, "run_pending_jobs", "--once")
    assert sweep.returncode == 0, sweep.stderr
    assert "Ran 1 pending run(s)." in sweep.stdout
    wait_until(job_finished(env["job_id"]), what="the job to finish")
    assert steps(env["job_id"]) == [("after-results", worker.pid)]
