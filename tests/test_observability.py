"""Health, readiness, metrics, logs and the status command, through real processes.

The consumer and the shim run as the real command in subprocesses (``--metrics-port``), against a
real broker (a private node where a test stops it) and the real database; the endpoints are read
over HTTP the way a probe or Prometheus reads them.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pika
import pytest

from consumer.redact import MASK, Redactor, redact_text, redact_url
from oioioi.workers.logging import HumanFormatter, JsonFormatter, logging_config
from results_endpoints.metrics import PrometheusObserver
from tests import helpers
from tests.broker import free_port
from tests.conftest import ROOT, make_settings, process_env, result_for

pytestmark = pytest.mark.django_db(transaction=True)

#: This module's waits are longer than the shared default.
wait_until = functools.partial(helpers.wait_until, timeout=40.0)


# --- helpers -------------------------------------------------------------------------------------


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of the process's /metrics (0 when the series is absent)."""
    status, body = get(port, "/metrics")
    assert status == 200
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if "{" in sample:
            sample_name, _, rest = sample.partition("{")
            sample_labels = ",".join(sorted(rest.rstrip("}").split(",")))
        else:
            sample_name, sample_labels = sample, ""
        if sample_name == name and sample_labels == wanted:
            return float(value)
    return 0.0


def readiness(port: int) -> tuple[int, dict]:
    status, body = get(port, "/readyz")
    return status, json.loads(body)


def with_metrics(start, *args: str, **kwargs):
    port = free_port()
    proc = start("--metrics-port", str(port), *args, **kwargs)
    wait_until(lambda: _answers(port), what="health port")
    return proc, port


def _answers(port: int) -> bool:
    try:
        return get(port, "/healthz", timeout=1)[0] == 200
    except OSError:
        return False


# --- health and readiness ---------------------------------------------------------------------------


def test_consumer_serves_health_readiness_and_metrics(start_consumer):
    # Given a consumer started with --metrics-port
    consumer, port = with_metrics(start_consumer)
    # Then it is alive, and ready once connected with the database answering
    assert get(port, "/healthz") == (200, b"ok\n")
    wait_until(lambda: readiness(port)[0] == 200, what="ready")
    assert readiness(port)[1] == {"ready": True, "checks": {"broker": True, "database": True}}
    status, body = get(port, "/metrics")
    assert status == 200
    assert b"oioioi_results_broker_connected 1.0" in body
    assert b'oioioi_results_settled_total{outcome="committed"} 0.0' in body
    assert b"process_cpu_seconds_total" in body
    assert get(port, "/nope")[0] == 404
    # And the port closes with the process
    assert consumer.stop() == 0
    assert not _answers(port)


def test_metrics_port_from_the_environment(start_consumer):
    port = free_port()
    start_consumer(METRICS_PORT=str(port))
    wait_until(lambda: _answers(port), what="health port from METRICS_PORT")


def test_health_answers_quickly_while_the_database_write_is_slow(start_consumer):
    # The endpoints read state, they never wait for the message path: many requests in a row
    # each answer in well under a second.
    _, port = with_metrics(start_consumer)
    started = time.monotonic()
    for _ in range(50):
        assert get(port, "/readyz", timeout=2)[0] == 200
        assert get(port, "/metrics", timeout=2)[0] == 200
    assert time.monotonic() - started < 10


def test_readyz_is_503_while_the_broker_is_down_and_200_after(private_broker, start_consumer):
    # Given a consumer on a broker node of the test's own
    settings = make_settings(private_broker.url)
    consumer, port = with_metrics(start_consumer, settings=settings)
    wait_until(lambda: readiness(port)[0] == 200, what="ready")
    # When the broker goes away
    private_broker.stop_app()
    # Then the consumer is still alive but not ready, and says why
    wait_until(lambda: readiness(port)[0] == 503, what="not ready")
    assert readiness(port)[1]["checks"] == {"broker": False, "database": True}
    assert get(port, "/healthz")[0] == 200
    assert metric(port, "oioioi_results_broker_connected") == 0
    # When it is back, the consumer reconnects and is ready again, having counted a reconnect
    private_broker.start_app()
    wait_until(lambda: readiness(port)[0] == 200, timeout=60, what="ready again")
    assert metric(port, "oioioi_results_reconnects_total") >= 1
    assert consumer.alive()


def test_counters_follow_results_and_bad_messages(broker, start_consumer, waiting_job):
    # Given a consumer with metrics and a job waiting for its result
    sent = waiting_job()
    _, port = with_metrics(start_consumer)
    assert metric(port, "oioioi_results_received_total") == 0
    # When a result arrives, then the same one again, then a body that is not JSON
    result = result_for(sent)
    broker.publish_env(result, message_id=result["group_id"])
    wait_until(
        lambda: metric(port, "oioioi_results_settled_total", outcome="committed") == 1,
        what="committed counted",
    )
    broker.publish_env(result, message_id=result["group_id"])
    broker.publish_raw(b"{not json", pika.BasicProperties(message_id="bad-1", delivery_mode=2))
    # Then each outcome is counted once, the dead letter by its reason
    wait_until(
        lambda: metric(port, "oioioi_results_dead_lettered_total", reason="undecodable") == 1,
        what="dead letter counted",
    )
    wait_until(
        lambda: metric(port, "oioioi_results_settled_total", outcome="duplicate") == 1,
        what="duplicate counted",
    )
    assert metric(port, "oioioi_results_received_total") == 3
    assert metric(port, "oioioi_results_settled_total", outcome="dead-lettered") == 1
    assert metric(port, "oioioi_results_dead_lettered_total", reason="invalid") == 0
    # And the write latency and the end-to-end age were observed for what was written
    assert metric(port, "oioioi_results_write_seconds_count") >= 2
    assert metric(port, "oioioi_results_age_seconds_count") == 2
    assert metric(port, "oioioi_results_database_up") == 1
    broker.wait_depth(broker.settings.dead_letter_queue, 1)


def test_shim_serves_metrics_and_counts_requests_by_status(start_shim):
    # Given a shim with --metrics-port
    port = free_port()
    shim = start_shim("--metrics-port", str(port), LOG_FORMAT="json")
    wait_until(lambda: _answers(port), what="shim health port")
    wait_until(lambda: readiness(port)[0] == 200, what="shim ready")
    assert readiness(port)[1]["checks"] == {"broker": True}
    # When it answers a good POST and a bad one
    good = urllib.parse.urlencode({"data": json.dumps({"job_id": "j", "error": {}})}).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{shim.port}/", data=good, timeout=10) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(f"http://127.0.0.1:{shim.port}/", data=b"data=%5B", timeout=10)
    assert bad.value.code == 400
    # Then both are counted by status, with their latency
    wait_until(
        lambda: metric(port, "oioioi_results_shim_requests_total", status="400") == 1,
        what="400 counted",
    )
    assert metric(port, "oioioi_results_shim_requests_total", status="200") == 1
    assert metric(port, "oioioi_results_shim_request_seconds_count") == 2
    # And its JSON log lines carry the ids and the outcome of each request
    shim.stop()
    lines = [json.loads(line) for line in shim.log.splitlines() if line.strip()]
    requests = [line for line in lines if "outcome" in line]
    assert [(r["outcome"], r["job_id"]) for r in requests] == [
        ("published", "j"),
        ("refused", None),
    ]


def test_shim_readyz_is_503_while_the_broker_is_down(private_broker, start_shim):
    port = free_port()
    start_shim("--metrics-port", str(port), settings=make_settings(private_broker.url))
    wait_until(lambda: readiness(port)[0] == 200, what="shim ready")
    private_broker.stop_app()
    wait_until(lambda: readiness(port)[0] == 503, what="shim not ready")
    private_broker.start_app()
    wait_until(lambda: readiness(port)[0] == 200, timeout=60, what="shim ready again")


# --- logs ------------------------------------------------------------------------------------------


def test_json_log_lines_parse_and_carry_the_message_ids(broker, start_consumer, waiting_job):
    # Given a consumer logging JSON
    sent = waiting_job()
    consumer = start_consumer(LOG_FORMAT="json")
    # When a result and a bad message arrive
    result = result_for(sent)
    broker.publish_env(result, message_id=result["group_id"])
    broker.publish_raw(b"\x80garbage", pika.BasicProperties(message_id="bad-2", delivery_mode=2))
    consumer.wait_for_log('"outcome": "committed"')
    consumer.wait_for_log('"outcome": "dead-lettered"')
    consumer.stop()
    # Then every line is one JSON object, and the lines about a message carry its ids
    lines = [json.loads(line) for line in consumer.log.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    committed = [line for line in lines if line.get("outcome") == "committed"]
    assert len(committed) == 1
    assert committed[0]["message_id"] == result["group_id"]
    assert committed[0]["group_id"] == result["group_id"]
    assert committed[0]["job_id"] == sent["job_id"]
    dead = [line for line in lines if line.get("outcome") == "dead-lettered"]
    assert [d["message_id"] for d in dead] == ["bad-2"]
    assert set(dead[0]) >= {"message_id", "job_id", "group_id", "outcome"}


def test_human_log_lines_carry_the_message_ids(broker, start_consumer, waiting_job):
    sent = waiting_job()
    consumer = start_consumer()
    result = result_for(sent)
    broker.publish_env(result, message_id=result["group_id"])
    consumer.wait_for_log("outcome=committed")
    line = next(line for line in consumer.log.splitlines() if "outcome=committed" in line)
    assert f"message_id={result['group_id']}" in line
    assert f"job_id={sent['job_id']}" in line


def test_no_password_in_logs_when_the_broker_fails(private_broker, start_consumer):
    # Given a broker user with a password, and a consumer using it
    password = f"pw-{uuid.uuid4().hex}"
    private_broker.ctl("add_user", "results-test", password)
    private_broker.ctl("set_permissions", "-p", "/", "results-test", ".*", ".*", ".*")
    url = f"amqp://results-test:{password}@127.0.0.1:{private_broker.port}/%2F"
    consumer = start_consumer(settings=make_settings(url))
    # When the broker goes away and comes back, and another consumer has the password wrong
    private_broker.stop_app()
    consumer.wait_for_log("Broker unavailable")
    private_broker.start_app()
    wrong = start_consumer(
        settings=make_settings(url.replace(password, password + "-wrong")), ready=False
    )
    wrong.wait_for_log("Broker unavailable")
    consumer.wait_for_log("Consuming from", timeout=60)
    # Then the logs tell what happened, with the URL redacted, and never the password
    for proc in (consumer, wrong):
        proc.stop()
        assert password not in proc.log
    assert f"amqp://results-test:{MASK}@127.0.0.1:{private_broker.port}/%2F" in consumer.log
    assert "ACCESS_REFUSED" in wrong.log or "Authentication" in wrong.log


def test_formatters_redact_urls_and_secrets_even_in_tracebacks():
    secret_url = "amqp://worker:hunter2-secret@broker:5672/%2F"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "lost %s", (secret_url,), None)
    try:
        raise ConnectionError(f"cannot reach {secret_url} with token tok-123456")
    except ConnectionError:
        record.exc_info = sys.exc_info()
    record.message_id = "m1"
    record.outcome = "dead-lettered"
    for formatter in (
        HumanFormatter(secrets=[secret_url, "tok-123456"]),
        JsonFormatter(secrets=[secret_url, "tok-123456"]),
    ):
        text = formatter.format(record)
        assert "hunter2-secret" not in text
        assert "tok-123456" not in text
        assert "amqp://worker:***@broker" in text
    line = json.loads(JsonFormatter(secrets=[secret_url]).format(record))
    assert (line["message_id"], line["job_id"], line["group_id"], line["outcome"]) == (
        "m1",
        None,
        None,
        "dead-lettered",
    )


def test_redaction_helpers():
    assert redact_url("amqps://u:p%40ss@h:5671/%2F?ssl_options=x") == "amqps://u:***@h:5671/%2F?***"
    assert redact_url("amqp://h/") == "amqp://h/"
    assert redact_url("postgres://a:b@[::1]:5432/db") == "postgres://a:***@[::1]:5432/db"
    assert redact_text("x amqp://a:b@c/ y") == "x amqp://a:***@c/ y"
    assert Redactor(["amqp://u:p%40ssword@h/"])("p@ssword p%40ssword") == "*** ***"
    # Short words are not replaced wherever they appear (that would mangle ordinary text).
    assert Redactor(["amqp://guest:abc@h/"])("abc") == "abc"


def test_log_format_setting_is_checked():
    assert logging_config("json", "INFO", [])["formatters"]["default"]["()"].endswith(
        "JsonFormatter"
    )
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logging_config("xml", "INFO", [])


def test_observer_labels_stay_a_fixed_set():
    observer = PrometheusObserver(process_metrics=False)
    for i in range(100):
        observer.dead_lettered(f"reason-{i}")
        observer.settled(f"outcome-{i}")
        observer.request(1000 + i, 0.01)
    text = io.StringIO()
    from prometheus_client import generate_latest

    text.write(generate_latest(observer.registry).decode())
    body = text.getvalue()
    assert 'oioioi_results_dead_lettered_total{reason="other"} 100.0' in body
    assert 'oioioi_results_settled_total{outcome="other"} 100.0' in body
    assert 'oioioi_results_shim_requests_total{status="other"} 100.0' in body
    observer.request(0, 0.01)  # the client left before an answer
    assert 'status="0"} 1.0' in generate_latest(observer.registry).decode()
    reasons = set(re.findall(r'^oioioi_results_dead_lettered_total\{reason="([^"]+)"', body, re.M))
    assert reasons == {
        "undecodable",
        "invalid",
        "rejected",
        "no-saved-environ",
        "mismatch",
        "delivery-limit",
        "permanent",
        "failed",
        "other",
    }


# --- results_status --------------------------------------------------------------------------------


def run_status(settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "results_status", *args],
        cwd=ROOT,
        env=process_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_results_status_reports_queues_dead_letters_and_jobs(
    broker, start_consumer, waiting_job, queue_settings
):
    # Given a waiting job, a dead letter and a consumer attached
    sent = waiting_job()
    waiting_job(submission_id=99)
    start_consumer()
    broker.publish_raw(b"[]", pika.BasicProperties(message_id="bad-3", delivery_mode=2))
    broker.wait_depth(queue_settings.dead_letter_queue, 1)
    # When an operator asks for the status as JSON
    proc = run_status(queue_settings, "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    # Then it shows the queues, the consumer, the dead letter by reason and the jobs
    queues = {q["role"]: q for q in status["broker"]["queues"]}
    assert queues["results"]["consumers"] == 1
    assert queues["results"]["messages"] == 0
    assert queues["dead letters"]["messages"] == 1
    assert status["dead_letters"]["by_reason"] == {"invalid": 1}
    assert status["jobs"]["by_state"]["WAITING"] == 2
    assert status["jobs"]["oldest_waiting"]["job_id"] == sent["job_id"]
    assert status["pending_runs"]["count"] == 0
    # And browsing left the dead letter where it was
    assert broker.depth(queue_settings.dead_letter_queue) == 1
    # And the human table says the same
    table = run_status(queue_settings)
    assert table.returncode == 0, table.stderr
    assert re.search(r"dead letters\s+" + re.escape(queue_settings.dead_letter_queue), table.stdout)
    assert re.search(r"invalid\s+1", table.stdout)
    assert re.search(r"WAITING\s+2", table.stdout)


def test_results_status_degrades_when_the_broker_is_unreachable(queue_settings, waiting_job):
    waiting_job()
    password = "status-test-password"
    settings = make_settings(f"amqp://someone:{password}@127.0.0.1:{free_port()}/%2F")
    proc = run_status(settings)
    # The database part is still shown; the broker part says it could not be reached; the exit
    # code tells a script that something is wrong; and the password appears nowhere.
    assert proc.returncode == 1
    assert "unreachable" in proc.stdout
    assert re.search(r"WAITING\s+1", proc.stdout)
    assert password not in proc.stdout + proc.stderr
    as_json = json.loads(run_status(settings, "--json").stdout)
    assert as_json["broker"]["reachable"] is False
    assert as_json["jobs"]["by_state"]["WAITING"] == 1
