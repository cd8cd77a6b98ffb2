"""The worker-side publisher and its command line, against a real broker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pika
import pytest

from consumer.brokers import node_name
from consumer.config import Settings
from consumer.errors import ConfirmTimeout, TransportError
from consumer.publish import Publisher, publish
from tests.broker import free_port
from tests.conftest import FIXTURES, ROOT, BrokerClient, make_settings

ENV = {"group_id": "GROUP_urn:uuid:42", "job_id": "urn:uuid:j", "workers_jobs.results": {}}


def queue_exists(settings: Settings, queue: str) -> bool:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        conn.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if conn.is_open:
            conn.close()


# --- the API -------------------------------------------------------------------------------------


def test_publish_declares_the_topology_and_the_message_is_persistent(amqp_url):
    settings = make_settings(amqp_url)
    assert not queue_exists(settings, settings.queue)
    # When a worker publishes before anything else has touched the broker
    assert publish(ENV, settings) == ENV["group_id"]
    # Then the topology exists and holds the message, persistent, identified by its group
    client = BrokerClient(settings)
    [(props, body)] = client.drain(settings.queue)
    assert json.loads(body) == ENV
    assert props.message_id == ENV["group_id"]
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    assert props.timestamp
    assert client.depth(settings.dead_letter_queue) == 0


def test_bytes_and_text_bodies_go_out_as_given_with_their_group_id(broker):
    text = json.dumps({**ENV, "group_id": "G-text"}, indent=2)
    raw = (FIXTURES / "sioworkersd_ping_env.json").read_bytes()
    assert publish(text, broker.settings) == "G-text"
    assert publish(raw, broker.settings) == json.loads(raw)["group_id"]
    assert publish(b"[not an environ", broker.settings) is None  # the consumer dead-letters it
    assert publish(ENV, broker.settings, message_id="explicit") == "explicit"
    got = broker.drain(broker.settings.queue)
    assert [(p.message_id, b) for p, b in got] == [
        ("G-text", text.encode()),
        (json.loads(raw)["group_id"], raw),
        (None, b"[not an environ"),
        ("explicit", json.dumps(ENV, separators=(",", ":")).encode()),
    ]


def test_unroutable_publish_is_repaired_by_redeclaring(broker, caplog):
    # Given a publisher whose queue was deleted under it (the message would be returned)
    publisher = Publisher(broker.settings, backoff_initial=0.01)
    publisher.connect()
    conn = pika.BlockingConnection(pika.URLParameters(broker.settings.amqp_url))
    conn.channel().queue_delete(broker.settings.queue)
    conn.close()
    # When it publishes, the first attempt is refused and the retry declares the queue again
    with caplog.at_level(logging.DEBUG, logger="consumer.publish"):
        publisher.publish(ENV)
    publisher.close()
    assert "Publish attempt 1 failed" in caplog.text
    assert "broker did not accept the message" in caplog.text
    assert broker.depth() == 1


def test_retries_are_bounded_with_backoff():
    settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    slept: list[float] = []
    publisher = Publisher(settings, attempts=4, backoff_max=0.5, sleep=slept.append)
    with pytest.raises(TransportError):
        publisher.publish(ENV)
    assert len(slept) == 3
    assert all(0 <= s <= 0.5 for s in slept)


class FakeTime:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_retries_go_on_for_the_time_budget_and_no_longer():
    # Given no broker, and a publisher's budget of 30 s (the default)
    settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    fake = FakeTime()
    publisher = Publisher(settings, sleep=fake.sleep, clock=fake.clock)
    assert publisher.timeout == settings.publish_timeout == 30.0
    # When it publishes, it tries again and again, with backoff, until the budget is spent
    with pytest.raises(TransportError, match=r"cannot connect to broker node 127\.0\.0\.1"):
        publisher.publish(ENV)
    assert sum(fake.slept) == pytest.approx(30.0, abs=0.01)
    assert len(fake.slept) >= 8
    assert max(fake.slept) <= publisher.backoff_max
    # And a budget of its own for one message
    fake.slept.clear()
    with pytest.raises(TransportError):
        publisher.publish(ENV, timeout=3.0)
    assert sum(fake.slept) == pytest.approx(3.0, abs=0.01)


def test_a_publish_the_broker_never_confirms_fails_within_its_timeout(private_broker):
    # Given a broker that holds every publish (its memory alarm blocks publishers), which is
    # what a quorum queue without a majority does to confirms
    settings = make_settings(private_broker.url)
    with Publisher(settings) as publisher:
        publisher.connect()
        private_broker.ctl("set_vm_memory_high_watermark", "0.0000001")
        try:
            # When a message is published with a budget of 2 s
            started = time.monotonic()
            with pytest.raises(ConfirmTimeout, match="within"):
                publisher.publish(ENV, timeout=2.0)
            took = time.monotonic() - started
        finally:
            private_broker.ctl("set_vm_memory_high_watermark", "0.4")
        # Then it gives up after 2 s, not when the broker lets go, with the connection dropped
        assert 2.0 <= took < 4.0, took
        assert not publisher.connected
        # And the next publish goes through once the broker takes messages again
        publisher.publish(ENV)
    assert BrokerClient(settings).depth(settings.queue) >= 1


def test_the_first_node_that_answers_is_used(broker):
    # Given a list of broker URLs whose first node does not answer
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    settings = broker.settings.replace(amqp_url=f"{dead} ; {broker.settings.amqp_url}")
    # When a result is published
    with Publisher(settings) as publisher:
        publisher.publish(ENV)
        # Then it went through the second, and the connection stays there
        assert publisher.node == node_name(broker.settings.amqp_url)
        publisher.publish(ENV)
    assert broker.depth() == 2


def test_one_connection_is_reused_and_replaced_after_a_loss(private_broker):
    settings = make_settings(private_broker.url)

    def connections() -> int:
        return len(private_broker.ctl("list_connections", "--silent", "pid").split())

    with Publisher(settings, backoff_initial=0.01) as publisher:
        for _ in range(3):
            publisher.publish(ENV)
        assert connections() == 1
        # An idle connection the broker has dropped is noticed while servicing it...
        private_broker.close_all_connections()
        deadline = time.monotonic() + 10
        while publisher.connected and time.monotonic() < deadline:
            publisher.service()
            time.sleep(0.05)
        assert not publisher.connected
        publisher.publish(ENV)
        # ...or, if not serviced, on the next publish, which goes to a new connection.
        private_broker.close_all_connections()
        time.sleep(0.5)  # the close has reached the client: the publish cannot have gone out
        publisher.publish(ENV)
        assert connections() == 1
    BrokerClient(settings).wait_depth(settings.queue, 5)


# --- the command line ----------------------------------------------------------------------------


def run_cli(settings: Settings, *args: str, stdin: bytes | None = None, **env: str) -> Any:
    options = [
        "--exchange",
        settings.exchange,
        "--queue",
        settings.queue,
        "--dead-letter-queue",
        settings.dead_letter_queue,
        "--retry-queue",
        settings.retry_queue,
        "--retry-delay-ms",
        str(settings.retry_delay_ms),
    ]
    return subprocess.run(
        [sys.executable, "-m", "consumer", "publish", *args, *options],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        env={**os.environ, "AMQP_URL": settings.amqp_url, **env},
        timeout=60,
    )


def test_cli_publishes_a_file_and_stdin(broker):
    path = FIXTURES / "sioworkersd_ping_env.json"
    done = run_cli(broker.settings, str(path))
    assert done.returncode == 0, done.stderr
    assert b"confirmed" in done.stderr
    body = json.dumps({**ENV, "group_id": "from-stdin"}).encode()
    done = run_cli(broker.settings, "-", stdin=body)
    assert done.returncode == 0, done.stderr
    got = broker.drain(broker.settings.queue)
    assert [(p.message_id, b) for p, b in got] == [
        (json.loads(path.read_bytes())["group_id"], path.read_bytes()),
        ("from-stdin", body),
    ]


def test_cli_takes_the_broker_url_option(broker, tmp_path):
    path = tmp_path / "env.json"
    path.write_text(json.dumps(ENV))
    done = run_cli(broker.settings, str(path), "--amqp-url", broker.settings.amqp_url, AMQP_URL="")
    assert done.returncode == 0, done.stderr
    assert broker.depth() == 1


@pytest.mark.parametrize(
    ("stdin", "args", "message"),
    [
        (b"{not json", [], "not JSON"),
        (b"[1, 2]", [], "JSON object"),
        (b'{"group_id": "g"}', [], "neither"),
        (b"\xff\xfe", [], "not UTF-8"),
        (json.dumps(ENV).encode(), ["--attempts", "0"], "at least 1"),
    ],
)
def test_cli_refuses_bad_input_with_status_2_and_publishes_nothing(broker, stdin, args, message):
    broker.depth()  # declare the topology, so that "nothing published" can be checked
    done = run_cli(broker.settings, "-", *args, stdin=stdin)
    assert done.returncode == 2
    assert message in done.stderr.decode()
    assert len(done.stderr.decode().strip().splitlines()) == 1
    assert broker.depth() == 0


def test_cli_force_publishes_an_object_the_consumer_will_refuse(broker):
    done = run_cli(broker.settings, "-", "--force", stdin=b'{"group_id": "g"}')
    assert done.returncode == 0, done.stderr
    assert broker.depth() == 1


def test_cli_missing_file_is_status_2(broker, tmp_path):
    done = run_cli(broker.settings, str(tmp_path / "missing.json"))
    assert done.returncode == 2
    assert "cannot read" in done.stderr.decode()


def test_cli_without_a_broker_is_status_1_with_one_clear_line(queue_settings):
    settings = queue_settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    done = run_cli(settings, "-", "--attempts", "2", stdin=json.dumps(ENV).encode())
    assert done.returncode == 1
    [line] = done.stderr.decode().strip().splitlines()
    assert line.startswith("error: not published:")
