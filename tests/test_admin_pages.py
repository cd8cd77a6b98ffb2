"""The operator pages in a real headless Chromium, against the real broker, consumer and ORM.

Each test serves the admin with pytest-django's live server, logs in through the login form and
clicks its way through, as an operator would. One screenshot of each page is kept under
``artifacts/screenshots/``.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission, User
from django.utils import timezone

from consumer import topology
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.models import DeadLetter, PendingRun, ReceivedResult
from tests import helpers
from tests.broker import free_port
from tests.browser import CHROMIUM_ARGS, chromium_path, kept_screenshot_path, screenshot_path
from tests.conftest import result_for
from tests.recipeapp.models import StepLog

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "operator-password-1"

#: What an operator gets: the return path's pages, replay and discard, and deleting a job.
OPERATOR_PERMISSIONS = [
    "workers.view_deadletters",
    "workers.replay_deadletters",
    "workers.view_receivedresult",
    "workers.view_pendingrun",
    "evalmgr.view_queuedjob",
    "evalmgr.delete_queuedjob",
    "evalmgr.view_savedenviron",
]

#: This module's waits are longer than the shared default.
wait_until = functools.partial(helpers.wait_until, timeout=60.0)


# --- browser, users, broker settings ---------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.fail("Chromium is not installed (apt-get install chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed (pip install -e '.[test]')", pytrace=False)
    # Playwright's sync API keeps an asyncio loop in this thread, which Django's guard against
    # blocking ORM calls from async code mistakes for an async view. The tests' ORM calls are
    # plain synchronous ones, so the guard is lifted for this module, and put back after it.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser: Any, live_server: Any) -> Iterator[Any]:
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1360, "height": 900})
    context.set_default_timeout(30_000)
    tab = context.new_page()
    yield tab
    context.close()


def make_user(username: str, *permissions: str, staff: bool = True) -> User:
    user = User.objects.create_user(username, password=PASSWORD, is_staff=staff)
    for permission in permissions:
        app_label, codename = permission.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


@pytest.fixture
def operator() -> User:
    return make_user("operator", *OPERATOR_PERMISSIONS)


def log_in(page: Any, username: str) -> None:
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    follow(page, "input[type=submit]")
    assert "/admin/login/" not in page.url, page.content()


def follow(page: Any, target: Any) -> None:
    """Click a link or button (a selector or a locator) and wait for the page it leads to."""
    with page.expect_navigation():
        if isinstance(target, str):
            page.click(target)
        else:
            target.click()


def shoot(page: Any, name: str) -> None:
    page.screenshot(path=str(screenshot_path(name)), full_page=True)


def messages_text(page: Any) -> str:
    return page.inner_text("ul.messagelist") if page.locator("ul.messagelist").count() else ""


@pytest.fixture
def admin_queues(project_queues: Any) -> Any:
    """Point the admin (Django settings) at this test's own queues."""
    return project_queues


def break_restore_function(job_id: str) -> str:
    """Make the job's resume fail as a bug would; returns the environ to put back."""
    saved = SavedEnviron.objects.get(queued_job_id=job_id)
    good = saved.environ
    env = saved.load_environ()
    env["restore_environ_func"] = "tests.recipeapp.recipes.no_such_function"
    saved.environ = json.dumps(env)
    saved.save()
    return good


def dead_letter_row(page: Any, text: str) -> Any:
    return page.locator("#result_list tbody tr", has_text=text)


def run_action(page: Any, action: str) -> None:
    """Run a dead-letter action on the rows ticked (Django's action bar), to its confirmation."""
    page.select_option("select[name=action]", action)
    follow(page, "button[name=index]")


def replay_to_the_end(page: Any) -> str:
    """Confirm a replay and wait for its progress page to finish; returns the summary."""
    follow(page, "#confirm-yes")
    page.wait_for_selector("body[data-replay-finished=yes]", timeout=60_000)
    return page.inner_text("#replay-done")


def archived(count: int) -> Callable[[], bool]:
    return lambda: DeadLetter.objects.unsettled().count() == count


# --- the dead-letter pages ----------------------------------------------------------------------


def test_operator_replays_one_dead_letter_and_discards_another(
    page, operator, admin_queues, broker, start_consumer, waiting_job
):
    # Given a result the consumer could not apply (the job's restore function is broken: a bug on
    # our side) and a body that is not even JSON, both dead-lettered by the real consumer, which
    # moves its dead letters into the database (committed, then acked)
    sent = waiting_job(submission_id=4321)
    good_environ = break_restore_function(sent["job_id"])
    start_consumer(RESULTS_DEAD_LETTER_ARCHIVE="true")
    result = result_for(sent)
    broker.publish_env(result, message_id=result["group_id"])
    broker.publish_raw(
        b"\x80 not json", pika.BasicProperties(message_id="garbage-1", delivery_mode=2)
    )
    dlq = admin_queues.dead_letter_queue
    wait_until(archived(2), what="the consumer to archive both dead letters")
    broker.wait_depth(dlq, 0, timeout=30)

    # When the operator logs in, the index shows the return path's status
    log_in(page, "operator")
    assert page.locator("#workers-status").is_visible()
    assert page.inner_text("#status-dead-letters").startswith("2")
    assert page.inner_text("#status-consumers").strip() == "1"
    assert page.inner_text("#status-results-depth").strip() == "0"
    assert sent["job_id"] in page.inner_text("#status-oldest")
    shoot(page, "admin-index")

    # The dead-letter page lists both, with reasons and their counts; reading changes nothing
    follow(page, "#workers-status a:has-text('Dead letters')")
    assert page.locator("#result_list tbody tr").count() == 2
    failed_row = dead_letter_row(page, "failed")
    assert sent["job_id"][:20] in failed_row.inner_text()
    assert "undecodable" in dead_letter_row(page, "garbage-1").inner_text()
    assert "failed (1)" in page.inner_text("#reason-filter")
    shoot(page, "deadletter-list")
    assert DeadLetter.objects.unsettled().count() == 2

    # The status panel has a page of its own too (OIOIOI's index is not ours to change)
    follow(page, "#status-link")
    assert page.inner_text("#status-dead-letters").startswith("2")
    shoot(page, "status")
    follow(page, "#workers-status a:has-text('Dead letters')")

    # One message: why it failed (the line that raised in view), its headers, its body
    follow(page, dead_letter_row(page, "failed").locator("a").first)
    assert "no_such_function" in page.inner_text("#detail-traceback")
    assert "Raised:" in page.inner_text("#detail-raised")
    assert "x-oioioi-reason" in page.inner_text("#detail-headers")
    body = page.inner_text("#detail-body")
    assert f'"job_id": "{sent["job_id"]}"' in body
    assert '\n  "' in body  # indented
    shoot(page, "deadletter-detail")

    # The bug is fixed; the operator replays the result, after a confirmation
    SavedEnviron.objects.filter(queued_job_id=sent["job_id"]).update(environ=good_environ)
    follow(page, "a:has-text('Dead letters')")
    dead_letter_row(page, "failed").locator("input[name=_selected_action]").check()
    run_action(page, "replay_selected")
    assert "Replay this message?" in page.inner_text("#confirm-question")
    assert page.locator("#confirm-list li").count() == 1
    shoot(page, "deadletter-confirm-replay")
    assert DeadLetter.objects.unsettled().count() == 2  # nothing happens before the confirmation
    assert "Done: 1 of 1 replayed." in replay_to_the_end(page)
    shoot(page, "deadletter-after-replay")

    # Then the job resumes and its recipe runs to the end; only the garbage is left
    wait_until(
        lambda: (
            StepLog.objects.filter(job_id=sent["job_id"]).exists()
            and not QueuedJob.objects.filter(job_id=sent["job_id"]).exists()
        ),
        what="the replayed result to resume the job",
    )
    assert ReceivedResult.objects.get(job_id=sent["job_id"]).outcome == "resumed"
    follow(page, "#replay-back")
    assert page.locator("#result_list tbody tr").count() == 1

    # Discarding the garbage empties the list
    dead_letter_row(page, "garbage-1").locator("input[name=_selected_action]").check()
    run_action(page, "discard_selected")
    assert "Discard" in page.inner_text("#confirm-question")
    shoot(page, "deadletter-confirm-discard")
    follow(page, "#confirm-yes")
    assert "Discarded 1 message" in messages_text(page)
    assert page.locator("#result_list tbody tr").count() == 0
    assert DeadLetter.objects.unsettled().count() == 0
    assert broker.depth(dlq) == 0


def test_a_replay_the_broker_refuses_leaves_the_message_in_the_dead_letters(
    page, operator, admin_queues, broker, start_consumer
):
    # Given a dead letter, and a results queue cut off from the exchange (a replayed copy has
    # nowhere to go, and the broker returns it)
    start_consumer(RESULTS_DEAD_LETTER_ARCHIVE="true")
    broker.publish_raw(b"{broken", pika.BasicProperties(message_id="keep-me", delivery_mode=2))
    wait_until(archived(1), what="the dead letter to be archived")
    connection = pika.BlockingConnection(pika.URLParameters(admin_queues.amqp_url))
    connection.channel().queue_unbind(
        admin_queues.queue, admin_queues.exchange, admin_queues.routing_key
    )
    connection.close()

    # When the operator replays it
    log_in(page, "operator")
    page.goto("/admin/workers/deadletter/")
    dead_letter_row(page, "keep-me").locator("input[name=_selected_action]").check()
    run_action(page, "replay_selected")
    summary = replay_to_the_end(page)

    # Then the page says it was refused and kept; the message is still a dead letter
    assert "Done: 0 of 1 replayed, 1 kept." in summary
    assert "1 refused by the broker (kept here)" in page.inner_text("#replay-progress")
    assert page.locator("#replay-failures").is_visible()
    assert "Refused by the broker, kept" in page.inner_text("#replay-failures")
    shoot(page, "deadletter-replay-refused")
    page.goto("/admin/workers/deadletter/")
    assert dead_letter_row(page, "keep-me").count() == 1
    assert broker.depth(admin_queues.queue) == 0


def test_dead_letter_details_an_operator_trips_over(page, operator, admin_queues, broker):
    # Given dead letters moved from the broker: one replayed twice already and failed again,
    # with a long traceback, and one whose body is over 256 KB
    connection = pika.BlockingConnection(pika.URLParameters(admin_queues.amqp_url))
    channel = connection.channel()
    topology.declare(channel, admin_queues)
    trace = "Traceback (most recent call last):\n" + "".join(
        f'  File "oioioi/module{i}.py", line {i}, in f{i}\n    call()\n' for i in range(60)
    )
    trace += "RuntimeError: the outermost failure, last line"
    channel.basic_publish(
        "",
        admin_queues.dead_letter_queue,
        json.dumps({"job_id": "urn:uuid:again", "group_id": "GROUP_AGAIN"}).encode(),
        pika.BasicProperties(
            message_id="GROUP_AGAIN",
            headers={
                "x-oioioi-dead-letter-id": "again-1",
                "x-oioioi-reason": "failed",
                "x-oioioi-traceback": trace,
                "x-oioioi-replays": 2,
            },
        ),
    )
    big = json.dumps({"job_id": "urn:uuid:big", "blob": "x" * 300_000}).encode()
    channel.basic_publish(
        "",
        admin_queues.dead_letter_queue,
        big,
        pika.BasicProperties(
            message_id="GROUP_BIG",
            headers={"x-oioioi-dead-letter-id": "big-1", "x-oioioi-reason": "invalid"},
        ),
    )
    connection.close()
    broker.wait_depth(admin_queues.dead_letter_queue, 2)
    log_in(page, "operator")

    # The list says what waits in the broker, and moves it on request
    page.goto("/admin/workers/deadletter/")
    assert "2 more dead letters wait" in page.inner_text("#broker-waiting")
    follow(page, "#archive-now")
    assert "Archived 2 dead letters" in messages_text(page)
    assert broker.depth(admin_queues.dead_letter_queue) == 0

    # The replay count is in the list and on the message's page
    assert "2 times" in dead_letter_row(page, "GROUP_AGAIN").inner_text()
    follow(page, dead_letter_row(page, "GROUP_AGAIN").locator("a").first)
    assert "2 times" in page.inner_text("#detail-replays")

    # The line that raised is shown above the traceback, and in view at its end
    assert "RuntimeError: the outermost failure, last line" in page.inner_text("#detail-raised")
    in_view = page.evaluate(
        "() => { const t = document.getElementById('detail-traceback');"
        " return t.scrollTop + t.clientHeight >= t.scrollHeight - 2 && t.scrollHeight > t.clientHeight; }"
    )
    assert in_view
    kept(page, "deadletter-detail-traceback")

    # Replay is the safe, primary button; only discard is red
    follow(page, "#replay-one")
    replay_colour = page.eval_on_selector(
        "#confirm-yes", "e => getComputedStyle(e).backgroundColor"
    )
    kept(page, "deadletter-confirm-replay-button")
    page.go_back()
    follow(page, "#discard-one")
    discard_colour = page.eval_on_selector(
        "#confirm-yes", "e => getComputedStyle(e).backgroundColor"
    )
    assert replay_colour != discard_colour, (replay_colour, discard_colour)
    red, green, blue = (int(c) for c in discard_colour[4:-1].split(",")[:3])
    assert red > 150 and green < 80 and blue < 80, discard_colour
    red, green, blue = (int(c) for c in replay_colour[4:-1].split(",")[:3])
    assert not (red > 150 and green < 80 and blue < 80), replay_colour

    # A body over 256 KB is cut on the page and downloadable whole
    page.goto("/admin/workers/deadletter/")
    follow(page, dead_letter_row(page, "GROUP_BIG").locator("a").first)
    assert "Only the first 256.0\xa0KB of 293.0\xa0KB" in page.inner_text("#detail-body-cut")
    with page.expect_download() as download_info:
        page.click("#detail-download")
    download = download_info.value
    assert Path(download.path()).read_bytes() == big
    kept(page, "deadletter-detail-big-body")


def kept(page: Any, name: str) -> None:
    page.screenshot(path=str(kept_screenshot_path(name)), full_page=False)


# --- permissions ------------------------------------------------------------------------------


def test_pages_refuse_staff_without_permission_and_csrf_stays_on(
    page, operator, admin_queues, broker, start_consumer, waiting_job
):
    sent = waiting_job()
    saved = SavedEnviron.objects.get(queued_job_id=sent["job_id"])
    start_consumer(RESULTS_DEAD_LETTER_ARCHIVE="true")
    broker.publish_raw(b"[]", pika.BasicProperties(message_id="not-an-environ", delivery_mode=2))
    wait_until(archived(1), what="the dead letter to be archived")
    letter = DeadLetter.objects.get()
    make_user("clerk")  # staff, no permission at all
    make_user("viewer", "workers.view_deadletters")  # may look, not replay
    make_user("visitor", *OPERATOR_PERMISSIONS, staff=False)

    job = f"/admin/evalmgr/queuedjob/{quote(QueuedJob.objects.get().pk)}/change/"
    pages = [
        "/admin/evalmgr/queuedjob/",
        job,
        "/admin/evalmgr/savedenviron/",
        f"/admin/evalmgr/savedenviron/{saved.pk}/change/",
        "/admin/workers/receivedresult/",
        "/admin/workers/pendingrun/",
        "/admin/workers/deadletter/",
        f"/admin/workers/deadletter/{letter.pk}/change/",
        f"/admin/workers/deadletter/{letter.pk}/body/",
        "/admin/workers/deadletter/replay/",
        "/admin/workers/deadletter/archive/",
        "/admin/workers/deadletterqueue/",
        "/admin/workers/deadletterqueue/status/",
    ]

    # A staff user without permissions is refused everywhere, and sees no status panel
    log_in(page, "clerk")
    assert page.locator("#workers-status").count() == 0
    for url in pages:
        response = page.goto(url)
        assert response.status == 403, url
    shoot(page, "refused-without-permission")

    # Someone who is not staff is sent to the login page
    page.context.clear_cookies()
    log_in_page = page.goto("/admin/login/")
    assert log_in_page.ok
    page.fill("#id_username", "visitor")
    page.fill("#id_password", PASSWORD)
    follow(page, "input[type=submit]")
    assert "/admin/login/" in page.url
    for url in pages:
        page.goto(url)
        assert "/admin/login/" in page.url, url

    # A viewer sees the dead letters but gets no replay or discard, and may not POST them
    page.context.clear_cookies()
    log_in(page, "viewer")
    page.goto("/admin/workers/deadletter/")
    assert page.locator("#result_list tbody tr").count() == 1
    assert page.locator("input[name=_selected_action]").count() == 0
    assert page.locator("select[name=action]").count() == 0
    assert page.locator("#archive-now").count() == 0
    for action in ("replay_selected", "discard_selected"):
        post_with_csrf(
            page,
            "/admin/workers/deadletter/",
            {
                "action": action,
                "_selected_action": str(letter.pk),
                "select_across": "0",
                "index": "0",
            },
        )
        post_with_csrf(
            page,
            "/admin/workers/deadletter/",
            {
                "action": action,
                "_selected_action": str(letter.pk),
                "select_across": "0",
                "post": "yes",
                "upto": str(letter.pk),
            },
        )
    response = post_with_csrf(
        page, "/admin/workers/deadletter/replay/", {"select_across": "1", "upto": str(letter.pk)}
    )
    assert response.status == 403
    assert DeadLetter.objects.unsettled().count() == 1
    assert broker.depth(admin_queues.queue) == 0

    # The operator may, with the CSRF token; without it even the operator is refused
    page.context.clear_cookies()
    log_in(page, "operator")
    response = post_with_csrf(
        page,
        "/admin/workers/deadletter/",
        {
            "action": "discard_selected",
            "_selected_action": str(letter.pk),
            "select_across": "0",
            "index": "0",
        },
    )
    assert response.status == 200
    assert "Discard dead letters: are you sure?" in response.text()
    assert f"<code>{letter.letter_id}</code>" in response.text()
    page.goto("/admin/workers/deadletter/")
    for url, form in [
        (
            "/admin/workers/deadletter/",
            {
                "action": "discard_selected",
                "_selected_action": str(letter.pk),
                "select_across": "0",
                "post": "yes",
                "upto": str(letter.pk),
            },
        ),
        ("/admin/workers/deadletter/replay/", {"select_across": "1", "upto": str(letter.pk)}),
    ]:
        response = page.request.post(url, form=form)
        assert response.status == 403
        assert "CSRF verification failed" in response.text()
    assert DeadLetter.objects.unsettled().count() == 1


def post_with_csrf(page: Any, url: str, form: dict[str, str]) -> Any:
    """POST from the logged-in browser, with its CSRF token."""
    page.goto("/admin/")
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    return page.request.post(
        url, form={**form, "csrfmiddlewaretoken": token}, headers={"Referer": page.url}
    )


# --- jobs, inbox and pending runs --------------------------------------------------------------


def result_rows(page: Any) -> int:
    return page.locator("#result_list tbody tr").count()


def search(page: Any, term: str) -> None:
    page.fill("#searchbar", term)
    with page.expect_navigation():
        page.press("#searchbar", "Enter")


def test_job_pages_flag_stale_jobs_and_search_and_filter(page, operator, admin_queues, waiting_job):
    # Given a job waiting for three hours, a fresh one, a queued one and what the inbox holds
    stale = waiting_job(submission_id=1111)
    fresh = waiting_job(submission_id=2222)
    QueuedJob.objects.filter(job_id=stale["job_id"]).update(
        creation_date=timezone.now() - timedelta(hours=3)
    )
    queued = QueuedJob.objects.create(
        job_id="urn:uuid:queued-job", state="QUEUED", submission_id=3333
    )
    ReceivedResult.objects.create(
        key="GROUP_A",
        message_id="GROUP_A",
        group_id="GROUP_A",
        job_id=fresh["job_id"],
        submission_id=2222,
        outcome="ignored",
    )
    ReceivedResult.objects.create(
        key="GROUP_B-urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
        message_id="GROUP_B-urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
        group_id="GROUP_B-urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
        job_id="urn:uuid:finished-job",
        submission_id=5555,
        outcome="resumed",
    )
    PendingRun.objects.create(
        job_id=queued.job_id, environ=json.dumps({"job_id": queued.job_id}), attempts=5
    )
    log_in(page, "operator")
    assert stale["job_id"] in page.inner_text("#status-oldest")
    assert page.inner_text("#status-stale").startswith("1 ")
    follow(page, "#workers-status a:has-text('Jobs needing attention')")
    assert result_rows(page) == 1 and "1111" in page.inner_text("#result_list")
    page.goto("/admin/")
    follow(page, "#workers-status a:has-text('Jobs WAITING for workers')")
    assert result_rows(page) == 2 and "3333" not in page.inner_text("#result_list")

    # Queued jobs: state, age and submission; the stale one is flagged
    page.goto("/admin/evalmgr/queuedjob/")
    assert result_rows(page) == 3
    stale_row = page.locator("#result_list tbody tr", has_text="1111")
    assert "needs attention" in stale_row.inner_text()
    assert "3 h" in stale_row.inner_text()
    assert (
        "needs attention" not in page.locator("#result_list tbody tr", has_text="2222").inner_text()
    )
    shoot(page, "queuedjob-list")
    follow(page, "#changelist-filter a:has-text('for more than 1 h')")
    assert result_rows(page) == 1 and "1111" in page.inner_text("#result_list")
    page.goto("/admin/evalmgr/queuedjob/")
    follow(page, "#changelist-filter a:has-text('Less than an hour')")
    assert result_rows(page) == 2 and "1111" not in page.inner_text("#result_list")
    page.goto("/admin/evalmgr/queuedjob/?state__exact=QUEUED")
    assert result_rows(page) == 1 and "3333" in page.inner_text("#result_list")
    page.goto("/admin/evalmgr/queuedjob/")
    search(page, "2222")
    assert result_rows(page) == 1 and fresh["job_id"] in page.inner_text("#result_list")
    search(page, stale["job_id"][9:20])
    assert result_rows(page) == 1 and "1111" in page.inner_text("#result_list")
    search(page, "no-such-thing")
    assert result_rows(page) == 0

    # One job: read-only, with its environ pretty-printed; deleting stays possible
    page.goto("/admin/evalmgr/queuedjob/?q=1111")
    follow(page, "#result_list tbody tr th a")
    content = page.inner_text("#content-main")
    assert "needs attention" in content
    assert f'"job_id": "{stale["job_id"]}"' in page.inner_text("pre.oioioi-pre")
    assert page.locator("input[name=_save]").count() == 0
    assert page.locator("textarea").count() == 0
    assert page.locator("a.deletelink").count() == 1
    shoot(page, "queuedjob-change")

    # Saved environs: the same signs, searchable by submission id
    page.goto("/admin/evalmgr/savedenviron/")
    assert result_rows(page) == 2
    shoot(page, "savedenviron-list")
    page.goto("/admin/evalmgr/savedenviron/?attention=stale")
    assert result_rows(page) == 1 and "1111" in page.inner_text("#result_list")
    page.goto("/admin/evalmgr/savedenviron/")
    search(page, "2222")
    assert result_rows(page) == 1
    follow(page, "#result_list tbody tr th a")
    assert '"submission_id": 2222' in page.inner_text("pre.oioioi-pre")
    assert page.locator("textarea").count() == 0
    shoot(page, "savedenviron-change")

    # The inbox: searchable by group, message and job id; each links to its job, if any is left
    page.goto("/admin/workers/receivedresult/")
    assert result_rows(page) == 2
    assert page.locator("a.addlink").count() == 0
    shoot(page, "receivedresult-list")
    kept(page, "receivedresult-list-1360px")
    # At 1360 px every column fits, *received at* (the last) included, with no scrolling
    fits = page.evaluate(
        "() => { const last = [...document.querySelectorAll('#result_list thead th')].pop();"
        " const box = document.querySelector('#changelist .results') || document.body;"
        " return [last.innerText, last.getBoundingClientRect().right,"
        " Math.min(window.innerWidth, box.getBoundingClientRect().right),"
        " box.scrollWidth, box.clientWidth]; }"
    )
    assert "RECEIVED AT" in fits[0].upper(), fits
    assert fits[1] <= fits[2] and fits[3] <= fits[4], fits
    search(page, "GROUP_B")
    assert result_rows(page) == 1
    assert "finished" in page.inner_text("#result_list")
    search(page, "finished-job")
    assert result_rows(page) == 1
    search(page, "GROUP_A")
    assert result_rows(page) == 1
    follow(page, f"#result_list a:has-text('{fresh['job_id']}')")
    assert "/admin/evalmgr/queuedjob/" in page.url
    assert fresh["job_id"] in page.inner_text("#content-main")
    assert "GROUP_A" in page.inner_text("#content-main")  # the job lists its received results
    page.goto("/admin/workers/receivedresult/?q=GROUP_A")
    follow(page, "#result_list tbody tr th a")
    assert page.locator("input[name=_save]").count() == 0
    assert page.locator("a.deletelink").count() == 0
    shoot(page, "receivedresult-change")

    # Pending runs: attempts and claims, the given-up one flagged
    page.goto("/admin/workers/pendingrun/")
    assert result_rows(page) == 1
    assert "given up" in page.inner_text("#result_list")
    page.goto("/admin/workers/pendingrun/?claim=stuck")
    assert result_rows(page) == 1
    page.goto("/admin/workers/pendingrun/?claim=unclaimed&age=older")
    assert result_rows(page) == 0
    page.goto("/admin/workers/pendingrun/")
    shoot(page, "pendingrun-list")


# --- the broker away -----------------------------------------------------------------------------


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word: a hung broker."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


def test_pages_say_clearly_when_the_broker_is_unreachable(
    page, operator, admin_queues, settings, silent_broker, waiting_job
):
    sent = waiting_job()
    DeadLetter.objects.create(
        letter_id="kept-1", reason="failed", job_id="urn:uuid:kept", body=b"{}", size=2
    )
    log_in(page, "operator")

    # A broker on which nothing has declared the queues yet: the page says what is missing, and
    # still lists what the database holds
    response = page.goto("/admin/workers/deadletter/")
    assert response.status == 200
    assert "does not exist" in page.inner_text("#broker-error")
    assert page.locator("#result_list tbody tr").count() == 1
    assert "queue not declared yet" in page.goto("/admin/").text()

    # A broker that does not answer: the index comes back quickly with a notice, jobs still shown
    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{silent_broker}/%2F"
    started = time.monotonic()
    response = page.goto("/admin/")
    assert response.status == 200
    assert time.monotonic() - started < 15
    assert "broker is unreachable" in page.inner_text("#broker-unreachable")
    assert "no answer within 4 s" in page.inner_text("#broker-unreachable")
    assert "guest:guest" not in page.content()
    assert sent["job_id"] in page.inner_text("#status-oldest")
    assert page.inner_text("#status-dead-letters").startswith("1")
    shoot(page, "admin-index-broker-unreachable")
    # ... and the dead letters within the same few seconds, in plain words
    started = time.monotonic()
    response = page.goto("/admin/workers/deadletter/")
    took = time.monotonic() - started
    assert response.status == 200
    assert took < 8, took
    error = page.inner_text("#broker-error")
    assert "did not answer in time" in error and "no answer within 4 s" in error, error
    assert "AMQPConnector" not in page.content() and "AddressFamily" not in page.content()
    assert page.locator("#result_list tbody tr").count() == 1
    kept(page, "deadletter-list-broker-timeout")

    # Each kind of failure in its own words
    port = free_port()
    for url, words in [
        (f"amqp://guest:guest@127.0.0.1:{port}/%2F", "cannot be reached"),
        (f"{admin_queues.amqp_url.rsplit('/', 1)[0]}/no-such-vhost", "no such virtual host"),
        (
            admin_queues.amqp_url.replace("guest:guest@", "guest:wrong-password@"),
            "refused access",
        ),
    ]:
        settings.AMQP_URL = url
        response = page.goto("/admin/workers/deadletter/")
        assert response.status == 200
        error = page.inner_text("#broker-error")
        assert words in error, (url, error)
        assert "wrong-password" not in page.content()
        assert "Error(" not in error and "<" not in error, error
    kept(page, "deadletter-list-access-refused")
    response = page.goto("/admin/")
    assert response.status == 200
    assert page.locator("#broker-unreachable").is_visible()
