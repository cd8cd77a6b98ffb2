"""The Prometheus alert rules: valid, each shown to fire and to stay quiet, on metrics that exist.

``deploy/prometheus/alerts.yml`` is checked with ``promtool check rules`` and its unit tests,
``alerts.test.yml``, run with ``promtool test rules`` (Debian's ``prometheus`` package ships
promtool; ``./dev test`` installs it). Then every metric a rule or a unit test names is looked
for where Prometheus would find it: the project's own in the exposition the consumer and the shim
serve, RabbitMQ's in what a real node with the ``rabbitmq_prometheus`` plugin serves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request

import pika
import pytest
import yaml
from prometheus_client import generate_latest

from consumer import topology
from consumer.config import Settings
from consumer.transport import connect
from results_endpoints.metrics import OUTCOMES, PrometheusObserver
from tests.broker import BrokerUnavailable, RabbitNode, free_port
from tests.conftest import ROOT

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULE_TESTS = RULES_DIR / "alerts.test.yml"

METRIC = re.compile(r"\b((?:oioioi_results|rabbitmq)_[a-z_]+)\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not shutil.which("promtool"):
        pytest.fail(
            "promtool is not installed (Debian: apt-get install prometheus; ./dev test does it)",
            pytrace=False,
        )
    return subprocess.run(
        ["promtool", *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120
    )


def rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def rule_tests() -> list[dict]:
    return yaml.safe_load(RULE_TESTS.read_text())["tests"]


def test_the_rules_are_valid():
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_the_rules_pass_their_unit_tests():
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_rule_is_shown_to_fire_and_to_stay_quiet():
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in rule_tests():
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names == {
        "OioioiResultsNoConsumer",
        "OioioiResultsWaitingLong",
        "OioioiResultsDeadLettered",
        "OioioiResultsDatabaseDown",
        "OioioiResultsCommitsStopped",
        "OioioiResultsShimUnavailable",
    }
    assert names - fires == set(), "rules never shown to fire"
    assert names - quiet == set(), "rules never shown to stay quiet"


def named_metrics() -> set[str]:
    """Every metric the rules, and the series of their unit tests, name."""
    names = {m for rule in rules() for m in METRIC.findall(rule["expr"])}
    for case in rule_tests():
        for series in case.get("input_series", []):
            names.add(series["series"].split("{", 1)[0])
    return names


def test_the_project_metrics_the_rules_read_exist():
    # What /metrics of the consumer and of the shim serves (the same registry code).
    observer = PrometheusObserver(process_metrics=False)
    observer.request(503, 0.1)
    observer.age_seconds(1.0)
    exposition = generate_latest(observer.registry).decode()
    served = {
        line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line[:1] != "#"
    }
    ours = {name for name in named_metrics() if name.startswith("oioioi_results_")}
    assert ours, "the rules read none of the project's metrics"
    assert ours <= served, ours - served
    # And the label values the rules select on are ones the metrics have.
    text = RULES.read_text()
    assert 'oioioi_results_age_seconds_bucket{le="900.0"}' in exposition
    assert 'le="900.0"' in text
    assert 'oioioi_results_shim_requests_total{status="503"}' in exposition
    for outcome in re.findall(r'outcome=~"([^"]+)"', text)[0].split("|"):
        assert outcome in OUTCOMES


def test_the_rabbitmq_metrics_the_rules_read_exist():
    # Given a real node with RabbitMQ's own exporter, and the project's queues on it
    node = RabbitNode()
    node.plugins = ["rabbitmq_prometheus"]
    port = free_port()
    node.extra_config = f"prometheus.tcp.port = {port}\nprometheus.tcp.ip = 127.0.0.1\n"
    try:
        node.start()
    except BrokerUnavailable as e:
        pytest.fail(f"Cannot start a private RabbitMQ node: {e}", pytrace=False)
    try:
        settings = Settings(amqp_url=node.url)  # the default queue names, as the rules have them
        connection = connect(settings)[0]
        channel = connection.channel()
        channel.confirm_delivery()
        topology.declare(channel, settings)
        channel.basic_publish(
            settings.exchange, settings.routing_key, b"{}", pika.BasicProperties(delivery_mode=2)
        )
        connection.close()
        # Then what it serves at /metrics/per-object (as the rules' header says to scrape it)
        # has every rabbitmq_ metric the rules and their tests name, for each queue they name
        theirs = {name for name in named_metrics() if name.startswith("rabbitmq_")}
        queues = set(re.findall(r'queue="([^"]+)"', RULES.read_text()))
        assert queues == {settings.queue, settings.dead_letter_queue}
        wanted = {(name, queue) for name in theirs for queue in queues}
        deadline = time.monotonic() + 60
        while True:
            url = f"http://127.0.0.1:{port}/metrics/per-object"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            found = {
                (m[1], m[2])
                for m in re.finditer(r'^(\w+)\{vhost="/",queue="([^"]+)"\}', text, re.M)
            }
            missing = wanted - found
            if not missing:
                break
            assert time.monotonic() < deadline, f"not served: {sorted(missing)}"
            time.sleep(1)  # the exporter refreshes its queue metrics every few seconds
    finally:
        node.stop()


def test_the_readme_says_how_to_load_them():
    readme = (ROOT / "README.md").read_text()
    assert "deploy/prometheus/alerts.yml" in readme
    assert "rule_files" in readme
    assert "/metrics/per-object" in readme
