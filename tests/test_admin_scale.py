"""The dead-letter pages with 10,000 dead letters, in a real headless Chromium, against the real
broker and ORM: the broker's dead-letter queue moved into the database by the archiver, the first
page, the counts per reason, a search by job id, one message, and a replay of 5,000 selected
across pages with its progress shown, each replayed message back in the results queue once.

It runs on a broker node of its own. The timings are printed (run with ``-s``); the README quotes
them. Screenshots are kept in ``tests/screenshots/``.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pika
import pytest
from django.core.management import call_command

from consumer import topology
from consumer.config import Settings
from oioioi.workers.models import DeadLetter
from tests.browser import kept_screenshot_path
from tests.conftest import BrokerClient, make_settings
from tests.test_admin_pages import browser, log_in, make_user, page  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.both_databases]

TOTAL = 10_000
REPLAYED = 5_000

#: (reason, how many): 5,000 failed (the replayed half), 2,500 invalid, 2,500 undecodable.
REASONS = {"failed": 5_000, "invalid": 2_500, "undecodable": 2_500}


def reason_of(i: int) -> str:
    if i % 2 == 0:
        return "failed"
    return "invalid" if i % 4 == 1 else "undecodable"


def fill_dead_letter_queue(settings: Settings, count: int) -> None:
    """``count`` dead letters, as the consumer writes them, in the broker's dead-letter queue."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    topology.declare(channel, settings)
    for i in range(count):
        reason = reason_of(i)
        group = f"GROUP_{i:05d}"
        body = json.dumps(
            {
                "job_id": f"urn:uuid:job-{i:05d}",
                "group_id": group,
                "submission_id": 100_000 + i,
                "saved_environ_id": i,
                "workers_jobs.results": {"ping": {"result_code": "OK"}},
            }
        ).encode()
        headers = {
            "x-oioioi-dead-letter-id": f"dl-{i:05d}",
            "x-oioioi-reason": reason,
            "x-oioioi-error": f"result {i} could not be applied ({reason})",
            "x-oioioi-error-class": "oioioi.workers.errors.Example",
            "x-oioioi-failed-at": "2026-12-01T10:00:00+00:00",
            "x-oioioi-traceback": (
                "Traceback (most recent call last):\n"
                '  File "oioioi/workers/resume.py", line 1, in write\n'
                f"ValueError: result {i} could not be applied"
            ),
        }
        if i % 10 == 0:
            headers["x-oioioi-replays"] = 1
        channel.basic_publish(
            "",
            settings.dead_letter_queue,
            body,
            pika.BasicProperties(
                message_id=group,
                delivery_mode=2,
                content_type="application/json",
                headers=headers,
            ),
        )
    connection.close()


def command(*args: str) -> str:
    out = io.StringIO()
    call_command("results_deadletters", *args, stdout=out)
    return out.getvalue()


def timed(what: str, timings: dict[str, float], func: Any) -> Any:
    started = time.monotonic()
    result = func()
    timings[what] = time.monotonic() - started
    return result


def shoot(tab: Any, name: str) -> None:
    tab.screenshot(path=str(kept_screenshot_path(name)), full_page=False)


@pytest.fixture
def project_queues(settings: Any, private_broker: Any) -> Settings:
    """Queues of this test's own, on a broker node of its own: 10,000 messages through a quorum
    queue are not left to weigh on the node the rest of the suite shares."""
    queues = make_settings(private_broker.url)
    settings.AMQP_URL = queues.amqp_url
    settings.RESULTS_EXCHANGE = queues.exchange
    settings.RESULTS_ROUTING_KEY = queues.routing_key
    settings.RESULTS_QUEUE = queues.queue
    settings.RESULTS_DEAD_LETTER_QUEUE = queues.dead_letter_queue
    settings.RESULTS_RETRY_QUEUE = queues.retry_queue
    settings.RESULTS_QUEUE_TYPE = queues.queue_type
    settings.RESULTS_RETRY_DELAY_MS = queues.retry_delay_ms
    settings.RESULTS_DELIVERY_LIMIT = queues.delivery_limit
    settings.RESULTS_MAX_RETRIES = queues.max_retries
    return queues


def test_ten_thousand_dead_letters(page, project_queues):  # noqa: F811
    broker = BrokerClient(project_queues)
    timings: dict[str, float] = {}
    make_user(
        "operator",
        "workers.view_deadletters",
        "workers.replay_deadletters",
        "workers.view_receivedresult",
    )

    # Given 10,000 dead letters in the broker's dead-letter queue, moved into the database by
    # the archiver (committed, then acked: the queue is empty, the table holds each once)
    fill_dead_letter_queue(project_queues, TOTAL)
    broker.wait_depth(project_queues.dead_letter_queue, TOTAL, timeout=120)
    out = timed("archive", timings, lambda: command("archive"))
    assert f"Moved {TOTAL} dead letter(s)" in out
    assert broker.depth(project_queues.dead_letter_queue) == 0
    assert DeadLetter.objects.unsettled().count() == TOTAL

    # The first page comes within 2 s, with the totals per reason and Django's paging
    log_in(page, "operator")
    response = timed("list", timings, lambda: page.goto("/admin/workers/deadletter/"))
    assert response.status == 200
    assert timings["list"] < 2.0, timings
    reasons = page.inner_text("#reason-filter")
    assert f"all ({TOTAL})" in reasons
    for reason, count in REASONS.items():
        assert f"{reason} ({count})" in reasons
    assert page.locator("#result_list tbody tr").count() == 100
    assert f"{TOTAL} dead letters" in page.inner_text(".paginator")
    fits = page.evaluate(
        "() => { const last = [...document.querySelectorAll('#result_list thead th')].pop();"
        " const box = document.querySelector('#changelist .results') || document.body;"
        " return [last.innerText, last.getBoundingClientRect().right,"
        " box.getBoundingClientRect().right, box.scrollWidth, box.clientWidth]; }"
    )
    assert "REPLAYED" in fits[0].upper() and fits[1] <= fits[2] and fits[3] <= fits[4], fits
    assert "once" in page.locator("#result_list tbody tr").nth(9).inner_text()  # dl-09990
    shoot(page, "deadletters-10000-list")

    # The counts agree with the command's
    assert len(json.loads(command("list", "--json", "--no-archive"))) == TOTAL
    for reason, count in REASONS.items():
        listed = json.loads(command("list", "--json", "--no-archive", "--reason", reason))
        assert len(listed) == count

    # A later page, and a search by job id that finds exactly one
    response = timed("page 57", timings, lambda: page.goto("/admin/workers/deadletter/?p=57"))
    assert response.status == 200
    assert page.locator("#result_list tbody tr").count() == 100
    page.fill("#searchbar", "urn:uuid:job-07777")

    def search() -> None:
        with page.expect_navigation():
            page.press("#searchbar", "Enter")

    timed("search", timings, search)
    assert page.locator("#result_list tbody tr").count() == 1
    assert "GROUP_07777" in page.inner_text("#result_list")
    shoot(page, "deadletters-10000-search")

    # One message: its reason, the replay count, the traceback's last line in view
    link = page.locator("#result_list tbody tr a").first

    def open_detail() -> None:
        with page.expect_navigation():
            link.click()

    timed("detail", timings, open_detail)
    assert page.inner_text("#detail-id") == "dl-07777"
    assert "ValueError: result 7777 could not be applied" in page.inner_text("#detail-raised")
    assert "never" in page.inner_text("#detail-replays")
    shoot(page, "deadletters-10000-detail")

    # Every failed one (5,000, across 50 pages) selected, confirmed, replayed with its progress
    page.goto("/admin/workers/deadletter/?reason=failed")
    assert page.locator("#result_list tbody tr").count() == 100
    page.click("#action-toggle")
    page.click(f"text=Select all {REPLAYED} dead letters")
    page.select_option("select[name=action]", "replay_selected")
    with page.expect_navigation():
        page.click("button[name=index]")
    assert f"these {REPLAYED} messages" in page.inner_text("#confirm-question")
    assert f"failed ({REPLAYED})" in page.inner_text("#confirm-reasons")
    shoot(page, "deadletters-10000-confirm-replay")
    started = time.monotonic()
    with page.expect_navigation():
        page.click("#confirm-yes")
    seen: list[str] = []
    while page.get_attribute("body", "data-replay-finished") != "yes":
        text = page.inner_text("#replay-progress")
        if not seen or seen[-1] != text:
            seen.append(text)
        if len(seen) == 3:
            shoot(page, "deadletters-10000-replay-progress")
        assert time.monotonic() - started < 300, seen
        time.sleep(0.05)
    timings["replay 5000"] = time.monotonic() - started
    assert f"Done: {REPLAYED} of {REPLAYED} replayed." in page.inner_text("#replay-summary")
    assert not page.locator("#replay-failures").is_visible()
    midway = [t for t in seen if t.startswith("Replayed ") and not t.startswith("Replayed 0 ")]
    assert any(f" of {REPLAYED}." in t and f"Replayed {REPLAYED} " not in t for t in midway), seen
    shoot(page, "deadletters-10000-replay-done")

    # Each replayed message is back in the results queue exactly once, counted as a replay;
    # the others are still dead letters, and the pages and the command say so
    replayed = broker.drain(project_queues.queue)
    ids = [props.message_id for props, _ in replayed]
    assert len(ids) == REPLAYED
    assert set(ids) == {f"GROUP_{i:05d}" for i in range(0, TOTAL, 2)}
    for props, _ in replayed:
        expected = 2 if int(props.message_id[6:]) % 10 == 0 else 1
        assert props.headers["x-oioioi-replays"] == expected
        assert "x-oioioi-reason" not in props.headers
    assert DeadLetter.objects.unsettled().count() == TOTAL - REPLAYED
    assert not DeadLetter.objects.unsettled().filter(reason="failed").exists()
    page.goto("/admin/workers/deadletter/")
    assert f"all ({TOTAL - REPLAYED})" in page.inner_text("#reason-filter")
    assert "failed" not in page.inner_text("#reason-filter")
    assert len(json.loads(command("list", "--json"))) == TOTAL - REPLAYED
    assert broker.depth(project_queues.dead_letter_queue) == 0

    print()
    print(f"Dead letters at scale ({TOTAL:,} archived, {REPLAYED:,} replayed):")
    for what, seconds in timings.items():
        print(f"  {what:<12} {seconds * 1000:8.0f} ms")
    print(f"  replay progress seen: {seen[:4]} ... {seen[-1:]}")
