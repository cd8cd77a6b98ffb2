"""What a broker outage writes to the logs: a handful of lines from the project, none from pika.

A consumer and the HTTP shim run on a private broker node; the node's broker stops for a while
(every connection closed, new ones refused) while three results are POSTed to the shim, and comes
back. Every line the two processes wrote from the stop until they work again is counted: the
consumer says once that the node was lost, once per attempt that it reconnects in N s, and once
where it consumes again; the shim says once that the node was lost, once per request (its 503 and
why), and once that a node answers again. No traceback, nothing from pika.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.parse

import pytest

from tests.conftest import make_settings
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

#: How long the broker stays away: several reconnect attempts of the consumer's backoff.
OUTAGE_SECONDS = 12.0
#: The shim's publish deadline here (its default is 10 s), so the requests end within the outage.
SHIM_PUBLISH_TIMEOUT = 3.0

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+): ")


def post(port: int, env: dict[str, object]) -> int:
    body = urllib.parse.urlencode({"data": json.dumps(env)}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/", body, {"Content-Type": "application/x-www-form-urlencoded"})
        return conn.getresponse().status
    finally:
        conn.close()


def lines_after(text: str, mark: int) -> list[str]:
    return text[mark:].splitlines()


def until(lines: list[str], last: str) -> list[str]:
    """The lines up to the first holding ``last``, that one included."""
    end = next((i for i, line in enumerate(lines) if last in line), None)
    assert end is not None, f"no line with {last!r}:\n" + "\n".join(lines)
    return lines[: end + 1]


def test_a_broker_outage_logs_a_handful_of_lines(private_broker, start_consumer, start_shim):
    settings = make_settings(private_broker.url)
    # The consumer's default backoff (make_settings's is shorter, for other tests' sake).
    consumer = start_consumer(settings=settings)
    shim = start_shim(settings=settings, SHIM_PUBLISH_TIMEOUT=str(SHIM_PUBLISH_TIMEOUT))
    env = {"job_id": "none", "saved_environ_id": 1, "error": {"message": "x"}}
    assert post(shim.port, {**env, "group_id": "before"}) == 200
    consumer.wait_for_log("'before'")
    marks = {"consumer": len(consumer.log), "shim": len(shim.log)}

    # When the broker stops, three results arrive meanwhile, and it comes back
    private_broker.stop_app()
    stopped = time.monotonic()
    statuses: list[int] = []
    posts = [
        threading.Thread(
            target=lambda i=i: statuses.append(post(shim.port, {**env, "group_id": f"g{i}"}))
        )
        for i in range(3)
    ]
    for thread in posts:
        thread.start()
    for thread in posts:
        thread.join()
    assert statuses == [503, 503, 503]
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))  # the outage's length
    private_broker.start_app()
    wait_until(lambda: "again, " in consumer.log[marks["consumer"] :], 60, "the consumer back")
    wait_until(lambda: post(shim.port, {**env, "group_id": "after"}) == 200, 30, "the shim back")
    consumer.wait_for_log("'after'")

    # Then each process wrote a handful of lines until it worked again, all of them the project's
    # (what follows is the usual line or two about the result sent after the outage)
    logged = {
        "consumer": until(lines_after(consumer.log, marks["consumer"]), "Consuming from"),
        "shim": until(lines_after(shim.log, marks["shim"]), "answers again"),
    }
    report = {name: len(lines) for name, lines in logged.items()}
    print(f"\nlines logged during a {OUTAGE_SECONDS:.0f}-second broker outage: {report}")
    for name, lines in logged.items():
        text = "\n".join(lines)
        assert "Traceback" not in text, text
        for line in lines:
            match = LINE.match(line)
            assert match, f"{name}: not a log line of ours: {line!r}\n{text}"
            assert match["logger"].split(".")[0] in ("consumer", "oioioi"), line

    consumer_text = "\n".join(logged["consumer"])
    assert consumer_text.count("Connection to broker node") == 1, consumer_text
    assert consumer_text.count("answers again") == 1, consumer_text
    assert consumer_text.count("Consuming from") == 1, consumer_text
    retries = consumer_text.count("reconnecting in")
    assert 2 <= retries <= 8, consumer_text
    assert len(logged["consumer"]) == retries + 3, consumer_text

    shim_text = "\n".join(logged["shim"])
    assert shim_text.count("Connection to broker node") == 1, shim_text
    assert shim_text.count("-> 503") == 3, shim_text
    assert shim_text.count("answers again") == 1, shim_text
    assert len(logged["shim"]) == 5, shim_text
