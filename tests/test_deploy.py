"""The deployment files: compose, image, process supervision, broker definitions and TLS.

There is no Docker engine here: the compose file is validated by Debian's ``docker-compose
config`` (``./dev test`` installs it) and by reading it; the image by reading its Dockerfile. The
broker definitions are loaded into a real private RabbitMQ node, and what each user may and may
not do is tried for real, including the whole results path through the real command. TLS is tried
against a private node with a certificate made by ``openssl`` in the test.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import yaml

from consumer import topology
from consumer.config import Settings
from consumer.errors import ConsumerError
from consumer.publish import publish
from oioioi.evalmgr.models import QueuedJob
from tests import helpers
from tests.broker import BrokerUnavailable, RabbitNode, free_port
from tests.conftest import ROOT, ConsumerProcess, process_env, result_for

DEPLOY = ROOT / "deploy"
DEFINITIONS = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())

#: The development passwords of the users in the definitions (README, "Deploying").
PASSWORDS = {
    "oioioi-admin": "oioioi-admin-dev",
    "oioioi-publisher": "oioioi-publisher-dev",
    "oioioi-consumer": "oioioi-consumer-dev",
}

#: This module's waits are longer than the shared default.
wait_until = functools.partial(helpers.wait_until, timeout=40.0)


# --- docker-compose.yml ------------------------------------------------------------------------


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    if not shutil.which("docker-compose"):
        pytest.fail(
            "docker-compose is not installed (./dev test installs it: apt-get install "
            "docker-compose)",
            pytrace=False,
        )
    return subprocess.run(
        ["docker-compose", "--project-directory", str(ROOT), "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_is_valid():
    proc = compose_config(ROOT / "docker-compose.yml")
    assert proc.returncode == 0, proc.stderr


def test_compose_validation_catches_mistakes(tmp_path):
    # The check above can fail: a misspelt key and a dependency on a missing service are refused.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose["services"]["consumer"]["stop_grace_periode"] = "10s"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose))
    assert compose_config(broken).returncode != 0
    compose["services"]["consumer"].pop("stop_grace_periode")
    compose["services"]["consumer"]["depends_on"]["nowhere"] = {"condition": "service_healthy"}
    broken.write_text(yaml.safe_dump(compose))
    assert compose_config(broken).returncode != 0


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_whole_system_from_one_image():
    services = _compose()["services"]
    assert {"rabbitmq", "postgres", "migrate", "consumer", "shim", "test"} <= services.keys()
    # One image for the consumer and the shim
    assert services["consumer"]["build"] == services["shim"]["build"]
    assert services["consumer"]["build"]["target"] == "runtime"
    assert "--http-shim" in services["shim"]["command"]
    # The broker loads the project's definitions and configuration, with a health check
    mounts = services["rabbitmq"]["volumes"]
    assert "./deploy/rabbitmq/definitions.json:/etc/rabbitmq/definitions.json:ro" in mounts
    assert "./deploy/rabbitmq/rabbitmq.conf:/etc/rabbitmq/rabbitmq.conf:ro" in mounts
    assert "management" in services["rabbitmq"]["image"]
    assert "healthcheck" in services["rabbitmq"]
    # The consumer waits for the migrations, stops on SIGTERM with time to finish its batch
    consumer = services["consumer"]
    assert consumer["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert consumer["stop_signal"] == "SIGTERM"
    assert int(consumer["stop_grace_period"].rstrip("s")) >= 120
    assert consumer["restart"] == "unless-stopped"
    # The test service runs the suite against the compose broker, only when asked for
    assert services["test"]["profiles"] == ["test"]
    assert "rabbitmq:5672" in services["test"]["environment"]["TEST_AMQP_URL"]


def _hash_matches(password_hash: str, password: str) -> bool:
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def test_compose_users_are_the_least_privileged_ones_with_working_passwords():
    services = _compose()["services"]
    users = {u["name"]: u for u in DEFINITIONS["users"]}
    for service, user in (("consumer", "oioioi-consumer"), ("shim", "oioioi-publisher")):
        url = urllib.parse.urlsplit(services[service]["environment"]["AMQP_URL"])
        assert url.username == user
        assert _hash_matches(users[user]["password_hash"], url.password or "")
        # Their users may not declare: the definitions do.
        assert services[service]["environment"]["RESULTS_DECLARE_TOPOLOGY"] == "false"
    for user, password in PASSWORDS.items():
        assert _hash_matches(users[user]["password_hash"], password), user


# --- the image -----------------------------------------------------------------------------------


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            name = line.split()[-1] if " AS " in line.upper() else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        current.append(line)
    return stages


def test_image_is_slim_non_root_and_stops_with_sigterm():
    stages = _stages()
    assert list(stages)[-1] == "runtime", "a plain `docker build` must give the runtime image"
    assert stages["base"][0].startswith("FROM python:3.11-slim")
    runtime = stages["runtime"]
    user = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert "STOPSIGNAL SIGTERM" in runtime
    assert any("start_receive_from_workers" in line for line in runtime if line.startswith("CMD"))
    # Everything copied into the image exists, and nothing the image needs is ignored.
    ignored = (ROOT / ".dockerignore").read_text().split()
    for stage in stages.values():
        for line in stage:
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), source
                    assert source not in ignored, source


# --- supervisord and systemd ---------------------------------------------------------------------


def test_supervisord_entries_parse_with_the_right_stop_and_restart_policy(tmp_path):
    from supervisor.datatypes import RestartUnconditionally
    from supervisor.options import ServerOptions

    # Rendered the way OIOIOI renders its supervisord.conf template, with three consumers.
    text = (DEPLOY / "supervisord" / "receive_from_workers.conf").read_text()
    text = text.replace("{{ PYTHON }}", sys.executable).replace("{{ PROJECT_DIR }}", str(tmp_path))
    (tmp_path / "logs").mkdir()
    text = text.replace("numprocs=1", "numprocs=3")
    (tmp_path / "programs.conf").write_text(text)
    main = tmp_path / "supervisord.conf"
    main.write_text(
        f"[supervisord]\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/s.pid\n"
        "[include]\nfiles=programs.conf\n"
    )
    options = ServerOptions()
    options.realize(args=["-c", str(main)])
    programs = {p.name: p for g in options.process_group_configs for p in g.process_configs}
    consumers = [programs[f"receive_from_workers-{i:02d}"] for i in range(3)]
    shim = programs["receive_from_workers_shim"]
    for program in [*consumers, shim]:
        assert program.stopsignal == signal.SIGTERM
        assert program.autorestart is RestartUnconditionally
        assert program.killasgroup
    assert all(p.stopwaitsecs >= 120 for p in consumers)
    assert [p.environment["METRICS_PORT"] for p in consumers] == ["9100", "9101", "9102"]
    assert consumers[0].command.endswith("manage.py start_receive_from_workers")
    assert shim.command.endswith("start_receive_from_workers --http-shim")


@pytest.mark.parametrize(
    ("unit", "name"),
    [
        ("oioioi-results-consumer@.service", "oioioi-results-consumer@9100.service"),
        ("oioioi-results-shim.service", "oioioi-results-shim.service"),
    ],
)
def test_systemd_units_verify_and_stop_gracefully(tmp_path, unit, name):
    import configparser

    text = (DEPLOY / "systemd" / unit).read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    service = parser["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= (120 if "consumer" in unit else 60)
    assert service["Restart"] == "always"
    assert parser["Unit"]["StartLimitIntervalSec"] == "0"
    # systemd's own check, on a copy pointing at this checkout's interpreter
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is not installed (Debian: systemd)", pytrace=False)
    copy = tmp_path / name
    copy.write_text(
        text.replace("/srv/oioioi/.venv/bin/python", sys.executable).replace(
            "/srv/oioioi", str(ROOT)
        )
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --- RabbitMQ definitions ------------------------------------------------------------------------


def test_definitions_declare_the_queues_exactly_as_the_consumer_does():
    # A queue declared with other arguments than it exists with is refused (PRECONDITION_FAILED),
    # so the definitions and consumer/topology.py must agree to the byte.
    settings = Settings()
    queues = {q["name"]: q for q in DEFINITIONS["queues"]}
    assert queues[settings.queue]["arguments"] == topology.results_queue_arguments(settings)
    assert queues[settings.retry_queue]["arguments"] == topology.retry_queue_arguments(settings)
    assert queues[settings.dead_letter_queue]["arguments"] == (
        topology.dead_letter_queue_arguments(settings)
    )
    assert all(q["durable"] and not q["auto_delete"] for q in queues.values())
    (exchange,) = DEFINITIONS["exchanges"]
    assert (exchange["name"], exchange["type"], exchange["durable"]) == (
        settings.exchange,
        "direct",
        True,
    )
    (binding,) = DEFINITIONS["bindings"]
    assert (binding["source"], binding["destination"], binding["routing_key"]) == (
        settings.exchange,
        settings.queue,
        settings.routing_key,
    )
    assert "guest" not in {u["name"] for u in DEFINITIONS["users"]}


@pytest.fixture
def defined_broker(tmp_path) -> Any:
    """A private node started with deploy/rabbitmq/rabbitmq.conf and the definitions."""
    try:
        node = RabbitNode()
    except BrokerUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    definitions = node.base / "definitions.json"
    shutil.copy(DEPLOY / "rabbitmq" / "definitions.json", definitions)
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    node.extra_config = conf.replace("/etc/rabbitmq/definitions.json", str(definitions))
    node.url = url_for(node, "oioioi-admin")  # there is no guest to wait with
    try:
        node.start()
    except BrokerUnavailable as e:
        pytest.fail(f"Cannot start a private RabbitMQ node: {e}", pytrace=False)
    yield node
    node.stop()


def url_for(node: RabbitNode, user: str) -> str:
    return f"amqp://{user}:{PASSWORDS[user]}@127.0.0.1:{node.port}/%2F"


def _refused(action) -> str:
    """Run ``action``; it must be refused by the broker; returns the refusal's text."""
    with pytest.raises((pika.exceptions.AMQPError, ConsumerError)) as refused:
        action()
    return str(refused.value)


@pytest.mark.django_db(transaction=True)
def test_definitions_give_each_user_only_what_it_needs(defined_broker, tmp_path, waiting_job):
    node = defined_broker
    # No guest user: the definitions replace the default one.
    assert "guest" not in node.ctl("list_users")
    text = _refused(
        lambda: pika.BlockingConnection(
            pika.URLParameters(node.url.replace("oioioi-admin:oioioi-admin-dev", "guest:guest"))
        )
    )
    assert "ACCESS_REFUSED" in text or "Authentication" in text

    publisher = Settings(amqp_url=url_for(node, "oioioi-publisher"), declare_topology=False)
    consumer = Settings(amqp_url=url_for(node, "oioioi-consumer"), declare_topology=False)

    # The publisher may publish to the results exchange (confirmed) ...
    sent = waiting_job()
    result = result_for(sent)
    publish(result, publisher)
    # (and so may a worker with the command-line publisher, told not to declare)
    cli = subprocess.run(
        [sys.executable, "-m", "consumer", "publish", "-", "--force"],
        input=b'{"not": "a result"}',
        cwd=ROOT,
        env=process_env(publisher, RESULTS_DECLARE_TOPOLOGY="false"),
        capture_output=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    # ... but not read the queue, publish elsewhere, or declare the topology.
    conn = pika.BlockingConnection(pika.URLParameters(publisher.amqp_url))
    try:
        assert "ACCESS_REFUSED" in _refused(
            lambda: conn.channel().basic_get(consumer.queue, auto_ack=False)
        )
        assert "ACCESS_REFUSED" in _refused(
            lambda: conn.channel().basic_consume(consumer.queue, lambda *a: None)
        )
        assert "ACCESS_REFUSED" in _refused(lambda: conn.channel().queue_purge(consumer.queue))
    finally:
        conn.close()
    assert "ACCESS_REFUSED" in _refused(
        lambda: publish(b"{}", publisher.replace(declare_topology=True), attempts=1)
    )

    # The consumer user runs the real consumer: it resumes the job and dead-letters the bad one.
    proc = ConsumerProcess(
        consumer, tmp_path / "consumer.log", [], RESULTS_DECLARE_TOPOLOGY="false"
    )
    try:
        proc.wait_for_log("Consuming from")
        wait_until(
            lambda: not QueuedJob.objects.filter(job_id=sent["job_id"]).exists(),
            what="job resumed and finished",
        )
        proc.wait_for_log("dead-lettered")
        # Its status command may read the dead letters (non-destructively).
        status = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), "results_status", "--json"],
            cwd=ROOT,
            env=process_env(consumer, RESULTS_DECLARE_TOPOLOGY="false"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["dead_letters"]["by_reason"] == {"invalid": 1}
        assert {q["role"]: q["consumers"] for q in report["broker"]["queues"]}["results"] == 1
        # And it may replay them (this one is invalid, so the consumer dead-letters it again).
        command = ["results_deadletters", "replay", "--all", "--yes"]
        replay = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *command],
            cwd=ROOT,
            env=process_env(consumer, RESULTS_DECLARE_TOPOLOGY="false"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        wait_until(lambda: proc.log.count("dead-lettered (invalid)") == 2, what="replayed")
    finally:
        assert proc.stop() == 0
    assert proc.log.count("committed") >= 1

    # The consumer user may not delete or reconfigure the results queue.
    conn = pika.BlockingConnection(pika.URLParameters(consumer.amqp_url))
    try:
        assert "ACCESS_REFUSED" in _refused(lambda: conn.channel().queue_delete(consumer.queue))
        assert "ACCESS_REFUSED" in _refused(
            lambda: conn.channel().exchange_declare(consumer.exchange, "direct", durable=True)
        )
    finally:
        conn.close()
    assert node.ctl("list_queues", "name", "messages").count("\n") >= 4


# --- TLS -----------------------------------------------------------------------------------------


def _make_certificates(folder: Path) -> None:
    """A CA and a server certificate for localhost signed by it."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    if not shutil.which("openssl"):
        pytest.fail("openssl is not installed", pytrace=False)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=oioioi-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=localhost")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")  # fmt: skip


@pytest.fixture
def tls_broker(tmp_path) -> Any:
    node = RabbitNode()
    _make_certificates(tmp_path)
    for name in ("ca.pem", "server.pem", "server.key"):
        shutil.copy(tmp_path / name, node.base / name)
    node.tls_port = free_port()  # type: ignore[attr-defined]
    node.extra_config = (
        f"listeners.ssl.default = {node.tls_port}\n"  # type: ignore[attr-defined]
        f"ssl_options.cacertfile = {node.base}/ca.pem\n"
        f"ssl_options.certfile = {node.base}/server.pem\n"
        f"ssl_options.keyfile = {node.base}/server.key\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )
    try:
        node.start()
    except BrokerUnavailable as e:
        pytest.fail(f"Cannot start a private RabbitMQ node with TLS: {e}", pytrace=False)
    yield node
    node.stop()


@pytest.mark.django_db(transaction=True)
def test_results_travel_over_tls(tls_broker, tmp_path, waiting_job):
    ca = str(tmp_path / "ca.pem")
    port = tls_broker.tls_port
    options = urllib.parse.quote(repr({"ca_certs": ca, "server_hostname": "localhost"}))
    # Two ways to trust the broker: ssl_options in the URL, or the process's CA bundle.
    with_options = f"amqps://guest:guest@localhost:{port}/%2F?ssl_options={options}"
    plain = f"amqps://guest:guest@localhost:{port}/%2F"
    settings = Settings(amqp_url=with_options, exchange="tls.workers", queue="tls.results",
                        dead_letter_queue="tls.dead", retry_queue="tls.retry",
                        idle_tick=0.2)  # fmt: skip
    # Certificates are verified: without the CA the connection is refused.
    text = _refused(lambda: publish({"job_id": "x"}, settings.replace(amqp_url=plain), attempts=1))
    assert "CERTIFICATE_VERIFY_FAILED" in text
    # With it, a result published over TLS is consumed over TLS and resumes its job.
    sent = waiting_job()
    publish(result_for(sent), settings)
    proc = ConsumerProcess(
        settings.replace(amqp_url=plain), tmp_path / "consumer.log", [], SSL_CERT_FILE=ca
    )
    try:
        proc.wait_for_log("Consuming from")
        # (The user name goes too here: guest's password is its name.)
        assert re.search(r"on amqps://\S+:\*\*\*@localhost:\d+/%2F\.", proc.log)
        wait_until(
            lambda: not QueuedJob.objects.filter(job_id=sent["job_id"]).exists(),
            what="job resumed over TLS",
        )
    finally:
        assert proc.stop() == 0
