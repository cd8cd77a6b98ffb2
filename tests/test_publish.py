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

from consumer.config import Settings
from consumer.errors import TransportError
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
    with caplog.at_level(logging.INFO, logger="consumer.publish"):
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
