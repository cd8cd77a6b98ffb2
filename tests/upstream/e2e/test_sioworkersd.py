"""sioworkersd publishing results straight to the queue: a real ``twistd sioworkersd-amqp`` with
the return path installed by ``deploy/sioworkersd/install``, a real ``twistd worker``, OIOIOI's
own ``SioworkersdBackend`` sending the groups (XML-RPC ``run_group``), the shim, the consumer,
Celery, and a private RabbitMQ node that the tests stop.

Every process takes its results broker (``RESULTS_E2E_AMQP_URL``) from the private node; Celery
stays on the run's broker. sioworkersd logs in there as a user of its own whose password must
never reach its log.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from results_e2e.conftest import BrokerClient, Process, job_finished, steps, wait_until
from results_e2e.models import StepLog
from results_e2e.sioworkersd import (
    Sioworkersd,
    free_port,
    group_ids,
    identities,
    new_name,
    normalised,
    park,
    peek,
    private_node,
    results_env,
    statuses_on_disk,
)
from sio.workers.util import json_dumps

from consumer.config import Settings
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.models import PendingRun, ReceivedResult

pytestmark = pytest.mark.django_db(transaction=True)

BACKEND = "oioioi.sioworkers.backends.SioworkersdBackend"
#: A group one of whose jobs the worker cannot run: sioworkersd returns it with ``error``.
FAILING_JOBS = {"job0": {"job_type": "no-such-job"}}


@pytest.fixture(scope="module")
def node(django_db_blocker: Any) -> Iterator[Any]:
    """A private RabbitMQ node with a user for sioworkersd, whose password is a fresh secret."""
    rabbit = private_node()
    rabbit.secret = f"pw-{secrets.token_hex(12)}"
    rabbit.ctl("add_user", "sioworkersd", rabbit.secret)
    rabbit.ctl("set_permissions", "-p", "/", "sioworkersd", ".*", ".*", ".*")
    yield rabbit
    rabbit.stop()


@pytest.fixture
def private(node: Any, run_settings: Settings) -> Iterator[BrokerClient]:
    """The run's queues on the private node (as its administrator), empty before and after."""
    client = BrokerClient(run_settings.replace(amqp_url=node.url))
    s = client.settings
    client.purge(s.queue, s.retry_queue, s.dead_letter_queue)
    yield client
    node.start_app()  # a test that failed with the broker stopped leaves it stopped
    client.purge(s.queue, s.retry_queue, s.dead_letter_queue)


@pytest.fixture
def start_sioworkersd(node: Any, private: BrokerClient) -> Iterator[Callable[[], Sioworkersd]]:
    """Start sioworkersd and its worker, publishing to the private node as user sioworkersd;
    after the test, neither its password nor a URL with one is in sioworkersd's log."""
    started: list[Sioworkersd] = []
    url = private.settings.amqp_url.replace("guest:guest@", f"sioworkersd:{node.secret}@")
    assert node.secret in url

    def start() -> Sioworkersd:
        daemon = Sioworkersd(new_name("sioworkersd"), private.settings.replace(amqp_url=url))
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()
        assert node.secret not in daemon.log
        assert not re.search(r"amqps?://[^\s:/@]*:[^*\s/@][^\s/@]*@", daemon.log)


def _applied_once(env: dict[str, Any], step: str = "after-results") -> Callable[[], bool]:
    def done() -> bool:
        if step == "after-results":
            return job_finished(env["job_id"])()
        return (
            StepLog.objects.filter(job_id=env["job_id"], step=step).exists()
            and not QueuedJob.objects.filter(job_id=env["job_id"]).exists()
            and not PendingRun.objects.filter(job_id=env["job_id"]).exists()
        )

    return done


def _held_back(daemon: Sioworkersd) -> list[str]:
    return re.findall(r"Result (\S+) not published \(", daemon.log)


def test_groups_come_back_through_the_queue_as_the_http_path_carries_them(
    start_sioworkersd, start_worker, start_consumer, private
):
    # Given a sioworkersd with the return path, the shim where OIOIOI's receiver was, and
    # OIOIOI's SioworkersdBackend with SIOWORKERS_LISTEN_URL = "amqp:"
    sioworkersd = start_sioworkersd()
    shim_port = free_port()
    shim = start_consumer(
        "--http-shim", "--port", str(shim_port), ready=False, **results_env(private.settings)
    )
    shim.wait_for_log("HTTP shim listening")
    to_queue = {"RESULTS_E2E_SIOWORKERSD_URL": sioworkersd.url, "RESULTS_E2E_LISTEN_URL": "amqp:"}
    celery = start_worker(backend=BACKEND, **to_queue)

    # When three ping groups and a failing one are judged
    pings = [park() for _ in range(3)]
    failing = park(jobs=FAILING_JOBS)
    private.wait_depth(private.settings.queue, 4)
    # ... and then, SIOWORKERS_LISTEN_URL back at the shim, one more, from the same sioworkersd
    celery.stop()
    to_shim = {**to_queue, "RESULTS_E2E_LISTEN_URL": f"http://127.0.0.1:{shim_port}/"}
    celery = start_worker(backend=BACKEND, **to_shim)
    by_http = park()
    private.wait_depth(private.settings.queue, 5)

    # Then four came from sioworkersd itself and one through the shim, each persistent and
    # identified by its group
    messages = peek(private.settings, private.settings.queue)
    sources = sorted(props.app_id for props, _ in messages)
    assert sources == ["oioioi-http-shim", *["sioworkersd"] * 4]
    bodies = {json.loads(body)["job_id"]: (props, body) for props, body in messages}
    assert set(bodies) == {env["job_id"] for env in [*pings, failing, by_http]}
    for props, body in messages:
        env = json.loads(body)
        assert props.message_id == env["group_id"]
        assert props.delivery_mode == 2
        # The body is sioworkersd's json_dumps of the environ, as its POST's 'data' field is
        assert body == json_dumps(env).encode()
        expected_url = (
            "amqp:" if props.app_id == "sioworkersd" else f"http://127.0.0.1:{shim_port}/"
        )
        assert env["return_url"] == expected_url
    # ... byte for byte what the HTTP path carried for a group of the same shape, ids aside
    http_env = json.loads(bodies[by_http["job_id"]][1])
    amqp_env = json.loads(bodies[pings[0]["job_id"]][1])
    assert http_env["workers_jobs.results"]["job0"]["pong"] == by_http["job_id"]
    assert json_dumps(normalised(amqp_env, identities(amqp_env))) == json_dumps(
        normalised(http_env, identities(http_env))
    )
    failed = json.loads(bodies[failing["job_id"]][1])
    assert "no-such-job" in failed["error"]["message"] + failed["error"]["traceback"]

    # And the consumer applies every one: the pings finish their recipes, the failure its
    # error handlers
    start_consumer(**results_env(private.settings))
    for env in [*pings, by_http]:
        wait_until(_applied_once(env), timeout=60, what=f"job {env['job_id']} to finish")
        assert steps(env["job_id"]) == [("after-results", celery.pid)]
    wait_until(_applied_once(failing, "error-handled"), timeout=60, what="the failing job")
    inbox = dict(ReceivedResult.objects.values_list("key", "outcome"))
    assert inbox == {gid: "resumed" for gid in group_ids(messages)}
    assert not SavedEnviron.objects.exists()
    # sioworkersd published four and POSTed one, to the shim, which took it
    published = re.findall(r"Result (\S+) published, confirmed by the broker", sioworkersd.log)
    http_group = json.loads(bodies[by_http["job_id"]][1])["group_id"]
    assert sorted(published) == sorted(set(group_ids(messages)) - {http_group})
    assert re.search(rf"\b200\b.*{re.escape(http_group)}", shim.log), shim.log


def _stop_the_broker_and_hold(node: Any, sioworkersd: Sioworkersd, count: int) -> list[dict]:
    """Stop the broker, then judge ``count`` ping groups; returns their jobs once sioworkersd
    has said, for each, that it holds its result."""
    node.stop_app()
    jobs = [park() for _ in range(count)]
    wait_until(
        lambda: len(_held_back(sioworkersd)) == count,
        timeout=60,
        what=f"sioworkersd to hold back {count} results",
    )
    return jobs


def test_results_wait_for_a_stopped_broker_and_are_all_published_once_it_is_back(
    node, start_sioworkersd, start_worker, start_consumer, private
):
    # Given sioworkersd returning to the queue
    sioworkersd = start_sioworkersd()
    to_queue = {"RESULTS_E2E_SIOWORKERSD_URL": sioworkersd.url, "RESULTS_E2E_LISTEN_URL": "amqp:"}
    celery = start_worker(backend=BACKEND, **to_queue)
    # When the broker stops while four results come back
    jobs = _stop_the_broker_and_hold(node, sioworkersd, 4)
    # Then none is dropped and none goes anywhere else: sioworkersd keeps retrying, and no
    # return over HTTP is tried (upstream's 'Returning ... to url' lines)
    assert "to url" not in sioworkersd.log and "return error" not in sioworkersd.log
    # When the broker is back, every one is published, from sioworkersd, once
    node.start_app()
    private.wait_depth(private.settings.queue, 4, timeout=60)
    messages = peek(private.settings, private.settings.queue)
    assert sorted(group_ids(messages)) == sorted(_held_back(sioworkersd))
    assert {props.app_id for props, _ in messages} == {"sioworkersd"}
    assert len(re.findall(r"published after \d+ attempts", sioworkersd.log)) == 4
    # And the consumer applies each once
    start_consumer(**results_env(private.settings))
    for env in jobs:
        wait_until(_applied_once(env), timeout=60, what=f"job {env['job_id']} to finish")
        assert steps(env["job_id"]) == [("after-results", celery.pid)]
    assert sorted(ReceivedResult.objects.values_list("key", flat=True)) == sorted(
        group_ids(messages)
    )


def test_a_sioworkersd_killed_before_the_confirms_returns_each_result_applied_once(
    node, start_sioworkersd, start_worker, start_consumer, private
):
    # Given sioworkersd returning to the queue, a consumer, and two results already confirmed
    # (whose deletion from the task database may not have reached its disk yet)
    sioworkersd = start_sioworkersd()
    to_queue = {"RESULTS_E2E_SIOWORKERSD_URL": sioworkersd.url, "RESULTS_E2E_LISTEN_URL": "amqp:"}
    celery = start_worker(backend=BACKEND, **to_queue)
    consumer = start_consumer(**results_env(private.settings))
    confirmed = [park() for _ in range(2)]
    for env in confirmed:
        wait_until(_applied_once(env), timeout=60, what=f"job {env['job_id']} to finish")
    consumer.stop()
    # When four more come back while the broker is stopped, are on the task database's disk
    # as results to return, and sioworkersd is SIGKILLed
    held = _stop_the_broker_and_hold(node, sioworkersd, 4)
    held_groups = _held_back(sioworkersd)
    wait_until(
        lambda: all(
            statuses_on_disk(sioworkersd.database).get(g) == "to_return" for g in held_groups
        ),
        timeout=30,
        what="sioworkersd to sync its task database",
    )
    sioworkersd.kill()
    # ... and started again on that database once the broker is back
    node.start_app()
    sioworkersd.start()
    for group in held_groups:
        assert f"Trying again to return old task {group}" in sioworkersd.log
    # Then every held result is published, and the consumer applies each result exactly once
    start_consumer(**results_env(private.settings))
    for env in [*confirmed, *held]:
        wait_until(_applied_once(env), timeout=90, what=f"job {env['job_id']} to finish")
    for env in [*confirmed, *held]:
        assert steps(env["job_id"]) == [("after-results", celery.pid)]
    outcomes = list(ReceivedResult.objects.values_list("job_id", "outcome"))
    assert sorted(job for job, _ in outcomes) == sorted(e["job_id"] for e in [*confirmed, *held])
    assert {outcome for _, outcome in outcomes} == {"resumed"}
    private.wait_depth(private.settings.queue, 0)
    assert private.depth(private.settings.dead_letter_queue) == 0


def test_the_return_path_imports_nothing_of_django_and_refuses_a_bad_broker_url(
    start_sioworkersd,
):
    # sioworkersd's environment has no Django at all; the return path loads without it
    daemon = start_sioworkersd()
    probe = Process(
        "probe",
        [
            daemon.python,
            "-c",
            "import sys; import twisted.plugins.sioworkersd_amqp_plugin as p; "
            "print(p.serviceMaker.tapname, sorted(m for m in sys.modules if 'django' in m))",
        ],
        daemon.env,
    )
    assert probe.wait_exit() == 0, probe.log
    assert "sioworkersd-amqp []" in probe.log
    # A broker URL pika cannot read stops twistd before it listens, without repeating the URL
    daemon.stop()
    daemon.env_file.write_text("AMQP_URL=amqp://u:hunter2-secret@host:notaport/%2F\n")
    bad = Process(
        "sioworkersd-bad-url",
        [
            daemon.python,
            daemon.twistd,
            "-n",
            "-l-",
            "--pidfile=",
            "sioworkersd-amqp",
            f"--amqp-env-file={daemon.env_file}",
            f"--database={daemon.database}",
        ],
        daemon.env,
    )
    bad.wait_exit()  # (twistd's status after any bad option is 0)
    # (refused by the broker settings' own check, which names the setting and the URL redacted)
    assert "AMQP_URL: the URL ('amqp://u:***@host:notaport/%2F') cannot be read" in bad.log
    assert "hunter2" not in bad.log
    assert "Site starting" not in bad.log
