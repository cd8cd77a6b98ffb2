"""Several broker addresses in ``AMQP_URL``: reading the list, refusing a malformed one at start,
trying the nodes in order, failing over, and saying so once per node, never with a password."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from consumer.brokers import Nodes, node_name
from consumer.config import Settings, broker_urls, from_environ
from consumer.errors import ConnectionClosed
from consumer.publish import Publisher
from consumer.redact import Redactor, redact_url
from consumer.transport import Transport
from sioworkersd_amqp.config import ConfigError, broker_settings
from tests.broker import free_port
from tests.conftest import ROOT, make_settings, result_for
from tests.helpers import job_done, wait_until

SECRET = "hunter2-secret"
A = f"amqp://worker:{SECRET}@rabbit1.internal:5672/%2F"
B = f"amqp://worker:{SECRET}@rabbit2.internal/%2F"
C = f"amqps://worker:{SECRET}@[fd00::3]:5671/%2F?heartbeat=10"


# --- reading the list ------------------------------------------------------------------------------


def test_one_url_or_several_separated_by_semicolons():
    assert broker_urls(A) == (A,)
    assert broker_urls(f"{A};{B};{C}") == (A, B, C)
    assert broker_urls(f" {A} ;\n{B} ") == (A, B)
    assert Settings(amqp_url=f"{A};{B}").amqp_urls == (A, B)
    assert from_environ({"AMQP_URL": f"{A};{B}"}).amqp_urls == (A, B)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "AMQP_URL is empty"),
        (f"{A};", "entry 2 of 2 is empty"),
        (f"{A};;{B}", "entry 2 of 3 is empty"),
        (f"{A},{B}", "holds more than one URL; separate broker URLs with ';'"),
        (f"{A} {B}", "holds more than one URL"),
        (f"http://worker:{SECRET}@rabbit1/", "is not an amqp:// or amqps:// URL"),
        (f"worker:{SECRET}@rabbit1:5672", "is not an amqp:// or amqps:// URL"),
        (f"{A};rabbit2.internal", "entry 2 of 2 ('rabbit2.internal') is not an amqp://"),
        (f"amqp://worker:{SECRET}@/%2F", "names no host"),
        (f"amqp://worker:{SECRET}@rabbit1:56x2/%2F", "cannot be read"),
    ],
)
def test_a_malformed_list_is_refused_saying_where_without_the_password(value, message):
    with pytest.raises(ValueError, match="AMQP_URL") as caught:
        Settings(amqp_url=value)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


def test_pika_refuses_what_it_cannot_use_and_says_so_without_the_password():
    from consumer.transport import connection_parameters

    bad = Settings(amqp_url=f"{A};amqp://worker:{SECRET}@rabbit2/%2F?heartbeat=often")
    with pytest.raises(ValueError, match="rabbit2") as caught:
        connection_parameters(bad)
    assert SECRET not in str(caught.value)


def test_lists_are_redacted_url_by_url():
    assert redact_url(f"{A};{B}") == (
        "amqp://worker:***@rabbit1.internal:5672/%2F;amqp://worker:***@rabbit2.internal/%2F"
    )
    other = "amqp://w2:another-pw@rabbit2/%2F"
    redact = Redactor([f"{A};{other}"])
    assert redact(f"{SECRET} another-pw") == "*** ***"
    assert node_name(A) == "rabbit1.internal:5672"
    assert node_name(B) == "rabbit2.internal:5672"
    assert node_name(C) == "[fd00::3]:5671"


# --- the order nodes are tried in, and what is logged --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nodes_are_tried_from_the_last_that_answered_and_past_one_that_was_lost():
    nodes = Nodes([A, B, C])
    assert nodes.order() == [0, 1, 2]
    nodes.answered(1)
    assert nodes.order() == [1, 2, 0]  # sticks to the node that answers
    nodes.lost(1, "reset")
    assert nodes.order() == [2, 0, 1]  # a lost node is tried last
    nodes.lost(0, "reset")  # losing another node moves nothing
    assert nodes.order() == [2, 0, 1]
    nodes.passed_over(2)  # no confirm in time: another node first, nothing said
    assert nodes.order() == [0, 1, 2]


def test_each_change_of_a_nodes_state_is_logged_once(caplog):
    clock = Clock()
    nodes = Nodes([A, B], clock=clock)
    with caplog.at_level(logging.DEBUG, logger="consumer.brokers"):
        nodes.answered(0)
        for _ in range(16):  # every serving thread of a shim notices the loss
            nodes.lost(0, "connection reset")
        for _ in range(5):  # and every attempt while it is away
            nodes.refused(0, "connection refused")
        clock.now = 12.5
        nodes.answered(0)
        nodes.answered(0)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
    assert said == [
        ("WARNING", "Connection to broker node rabbit1.internal:5672 lost: connection reset."),
        ("INFO", "Broker node rabbit1.internal:5672 answers again, after 12.5 s."),
    ]
    assert SECRET not in caplog.text


# --- connecting --------------------------------------------------------------------------------------


def test_the_first_node_that_answers_takes_the_connection(queue_settings):
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    settings = queue_settings.replace(amqp_url=f"{dead};{queue_settings.amqp_url}")
    with Transport(settings, consume=False) as transport:
        assert transport.node == node_name(queue_settings.amqp_url)


def test_when_no_node_answers_the_error_names_each():
    ports = [free_port(), free_port()]
    settings = Settings(amqp_url=";".join(f"amqp://u:{SECRET}@127.0.0.1:{p}/%2F" for p in ports))
    with pytest.raises(ConnectionClosed) as caught:
        Transport(settings, consume=False)
    text = str(caught.value)
    assert text.startswith("no broker node answered (")
    for port in ports:
        assert f"127.0.0.1:{port}: ConnectionRefusedError" in text
    assert SECRET not in text


def test_a_publisher_gives_up_within_its_timeout_when_no_node_answers():
    settings = Settings(amqp_url=f"amqp://u:p@127.0.0.1:{free_port()}/%2F")
    with pytest.raises(ConnectionClosed):
        Publisher(settings, timeout=0.5, backoff_initial=0.05).publish({"error": {}})


# --- refused at start, by every program ------------------------------------------------------------


def test_the_publish_command_refuses_a_malformed_list_with_status_2():
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "publish", "-"],
        cwd=ROOT,
        input=b"{}",
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "AMQP_URL": f"{A};;{B}"},
        timeout=60,
    )
    assert done.returncode == 2
    assert "entry 2 of 3 is empty" in done.stderr.decode()
    assert SECRET not in done.stderr.decode()


def test_sioworkersd_refuses_a_malformed_list_at_start():
    with pytest.raises(ConfigError, match="holds more than one URL") as caught:
        broker_settings({"AMQP_URL": f"{A},{B}"})
    assert SECRET not in str(caught.value)
    assert broker_settings({"AMQP_URL": f"{A};{B}"}).amqp_urls == (A, B)


@pytest.mark.parametrize("shim", [False, True])
def test_the_consumer_and_the_shim_refuse_a_malformed_list_at_start(
    queue_settings, start_consumer, start_shim, shim
):
    settings = queue_settings.replace(amqp_url=queue_settings.amqp_url)
    env = {"AMQP_URL": f"{queue_settings.amqp_url};amqp://guest:{SECRET}@;"}
    proc = (
        start_shim(settings=settings, ready=False, **env)
        if shim
        else start_consumer(settings=settings, ready=False, **env)
    )
    wait_until(lambda: not proc.alive(), 60, "the process to exit")
    assert proc.proc.returncode == 1
    assert "AMQP_URL: entry 2 of 3" in proc.log
    assert SECRET not in proc.log
    assert "Traceback" not in proc.log


@pytest.mark.django_db(transaction=True)
def test_the_consumer_fails_over_to_a_node_that_answers(
    queue_settings, start_consumer, broker, waiting_job
):
    # Given a consumer whose first node is gone
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    settings = make_settings(f"{dead};{queue_settings.amqp_url}").replace(
        exchange=queue_settings.exchange,
        queue=queue_settings.queue,
        dead_letter_queue=queue_settings.dead_letter_queue,
        retry_queue=queue_settings.retry_queue,
    )
    consumer = start_consumer(settings=settings)
    # Then it consumes from the second, and says where
    port = queue_settings.amqp_url.split("@127.0.0.1:")[1].split("/")[0]
    assert f"@127.0.0.1:{port}/%2F." in consumer.log
    sent = waiting_job()
    broker.publish_env(result_for(sent))
    wait_until(job_done(sent["job_id"]), 30, "the result applied")


def test_a_private_node_may_open_as_many_files_as_the_machine_allows(private_broker):
    import os
    import resource

    # A node limited to 1024 open files stopped accepting connections after a whole session's
    # queues (see tests.broker.RabbitNode._server_command)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = private_broker.open_files_limit()
    if os.geteuid() == 0:
        assert limit == hard
    else:
        assert limit is not None and limit > 0
