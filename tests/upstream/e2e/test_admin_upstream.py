"""The operator pages inside upstream OIOIOI, in a real headless Chromium.

An operator logs in through OIOIOI's own login page, finds the return path's pages in OIOIOI's
system-admin menu, and works with real data: a job parked by upstream's evaluation manager, a
consumer (this project's ``start_receive_from_workers``) dead-lettering what it cannot apply on
the real RabbitMQ, a replay that resumes the job through upstream's ``delay_environ``, and the
inbox and pending-run rows that leaves in PostgreSQL. A user who is not an operator is refused,
although OIOIOI's admin site lets every active user in.

Self-contained: the fixtures are this module's own, and so are its queues (its consumer and the
live server share them, and nothing else does). Screenshots go to ``artifacts/screenshots/`` of
the project (``RESULTS_PROJECT_ROOT``), named ``upstream-*``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlencode

import pika
import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone
from oioioi.contests.models import Submission

from consumer.publish import publish
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.evalmgr.tasks import create_environ, evalmgr_job, transfer_job
from oioioi.evalmgr.utils import mark_job_state
from oioioi.workers.conf import consumer_settings
from oioioi.workers.models import DeadLetter, PendingRun, ReceivedResult

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "operator-password-1"

#: A non-superuser operator's permissions: every page of the return path, replay and discard.
OPERATOR_PERMISSIONS = [
    "workers.view_deadletters",
    "workers.replay_deadletters",
    "workers.view_receivedresult",
    "workers.view_pendingrun",
    "evalmgr.view_savedenviron",
]

#: The return path's entries of OIOIOI's system-admin menu, as the menu shows them.
MENU = ["Return path status", "Dead letters", "Received results", "Pending runs", "Saved environs"]

#: What upstream's ``restore_job`` is called, and a restore function that is a bug.
RESTORE = "oioioi.sioworkers.handlers.restore_job"
BROKEN_RESTORE = "oioioi.sioworkers.handlers.no_such_restore_function"

#: Upstream's test fixtures of one submission (with its contest, problem and users).
SUBMISSION_FIXTURES = [
    "test_users",
    "test_contest",
    "test_full_package",
    "test_problem_instance",
    "test_submission",
]

#: This module's queues: a run id of its own, so no other test's consumer takes its messages.
RUN = f"{os.environ.get('RESULTS_E2E_RUN', 'x')}-admin-{uuid.uuid4().hex[:4]}"

WAIT = 60.0


def _project_module(relative: str) -> ModuleType:
    """A module of the project's own test suite, loaded by its path (the project's ``tests``
    package is not importable inside upstream's tree)."""
    root = os.environ.get("RESULTS_PROJECT_ROOT")
    if not root:
        pytest.fail("RESULTS_PROJECT_ROOT is not set (run this through tests/upstream/run)")
    path = Path(root) / relative
    spec = importlib.util.spec_from_file_location(f"results_project_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The standalone browser tests' Chromium, flags and screenshot folder.
browser_helpers = _project_module("tests/browser.py")


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


# --- the jobs, parked by upstream's evaluation manager ----------------------------------------

#: What "sioworkersd" was handed by upstream's ``_transfer_job`` (in this process).
SENT: list[dict[str, Any]] = []


def send_to_workers(environ: dict[str, Any]) -> None:
    """The transfer function: keep what sioworkersd would get (upstream's strips these two)."""
    SENT.append({k: v for k, v in environ.items() if k not in ("recipe", "error_handlers")})


def transfer_to_workers(environ: dict[str, Any], restore: str = RESTORE) -> dict[str, Any]:
    """A recipe phase handing the job to the workers, as upstream's sioworkers phases do."""
    return transfer_job(environ, f"{__name__}.send_to_workers", restore)


def park_job(restore: str = RESTORE, submission_id: int | None = None) -> dict[str, Any]:
    """A job WAITING for the workers, parked by upstream's ``evalmgr_job`` (run here, in this
    process): its ``SavedEnviron`` saved and the environ sent out. Returns that environ."""
    env = create_environ()
    if submission_id is not None:
        env["submission_id"] = submission_id
    env["recipe"] = [("transfer", f"{__name__}.transfer_to_workers", {"restore": restore})]
    with transaction.atomic():
        mark_job_state(env, "QUEUED")
    evalmgr_job.apply((env,))
    sent = SENT.pop()
    assert sent["job_id"] == env["job_id"] and "saved_environ_id" in sent
    assert QueuedJob.objects.get(job_id=env["job_id"]).state == "WAITING"
    return sent


def result_for(sent: dict[str, Any]) -> dict[str, Any]:
    """What sioworkersd returns for ``sent``."""
    return {
        **sent,
        "group_id": f"GROUP_{uuid.uuid4().urn}",
        "workers_jobs.results": {"ping": {"result_string": "pong", "result_code": "OK"}},
    }


# --- broker and consumer ------------------------------------------------------------------------


@pytest.fixture
def queues(settings: Any) -> Iterator[Any]:
    """This module's queues for the live server (here) and the consumer (through RUN); removed
    after the test, with the Celery queue its runs are relayed to."""
    names = {
        "RESULTS_EXCHANGE": f"e2e-{RUN}.workers",
        "RESULTS_QUEUE": f"e2e-{RUN}.results",
        "RESULTS_DEAD_LETTER_QUEUE": f"e2e-{RUN}.results.dead",
        "RESULTS_RETRY_QUEUE": f"e2e-{RUN}.results.retry",
    }
    for name, value in names.items():
        setattr(settings, name, value)
    yield consumer_settings()
    amqp = pika.BlockingConnection(pika.URLParameters(settings.AMQP_URL))
    channel = amqp.channel()
    celery = f"evalmgr-{RUN}"  # Celery names the queue's exchange after it
    for queue in (*list(names.values())[1:], celery):
        channel.queue_delete(queue)
    for exchange in (names["RESULTS_EXCHANGE"], celery):
        channel.exchange_delete(exchange)
    amqp.close()


def depth(settings: Any, queue: str) -> int:
    amqp = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        return amqp.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        amqp.close()


@pytest.fixture
def consumer(queues: Any, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``start_receive_from_workers`` of the installed tree, on the test database and the queues."""
    log_path = tmp_path / "consumer.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "results_e2e.settings",
        "RESULTS_E2E_RUN": RUN,
        "RESULTS_E2E_DATABASE": connection.settings_dict["NAME"],
        "PYTHONUNBUFFERED": "1",
        # The consumer moves its dead letters into the database, where these pages list them.
        "RESULTS_DEAD_LETTER_ARCHIVE": "true",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "django", "start_receive_from_workers"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "Consuming from" in log_path.read_text() or proc.poll() is not None,
            "the consumer to start",
        )
        assert proc.poll() is None, f"the consumer exited:\n{log_path.read_text()}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sys.stderr.write(f"--- consumer log ---\n{log_path.read_text(errors='replace')}\n")


# --- browser and users --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = browser_helpers.chromium_path()
    if path is None:
        pytest.fail("Chromium is not installed (apt-get install chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed in the tier's venv", pytrace=False)
    # Playwright's sync API keeps an asyncio loop in this thread, which Django's guard against
    # blocking ORM calls from async code mistakes for an async view (see tests/test_admin_pages).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(
                executable_path=path, args=browser_helpers.CHROMIUM_ARGS
            )
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


def make_user(username: str, *permissions: str, superuser: bool = False) -> User:
    # Not staff: OIOIOI's admin site does not ask for the flag (its user admin does not show it).
    user = User.objects.create_user(username, password=PASSWORD, is_superuser=superuser)
    for permission in permissions:
        app_label, codename = permission.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def log_in(page: Any, username: str) -> None:
    """Through OIOIOI's own login page: its admin site sends there."""
    page.goto("/admin/")
    assert "/login/" in page.url, page.url
    page.fill("#id_auth-username", username)
    page.fill("#id_auth-password", PASSWORD)
    follow(page, "#id_auth-password >> xpath=ancestor::form//button[@type='submit']")
    assert "/login/" not in page.url, page.content()


def follow(page: Any, target: Any) -> None:
    """Click a link or button (a selector or a locator) and wait for the page it leads to."""
    with page.expect_navigation():
        if isinstance(target, str):
            page.click(target)
        else:
            target.click()


def shoot(page: Any, name: str) -> None:
    page.screenshot(path=str(browser_helpers.screenshot_path(f"upstream-{name}")), full_page=True)


def menu_link(page: Any, text: str) -> Any:
    """An entry of OIOIOI's side menu (its system-admin menu, for the return path's pages)."""
    return page.locator("#menu a.list-group-item", has_text=text)


def open_from_menu(page: Any, text: str) -> None:
    """Click the side menu's entry ``text``, opening its folded panel first if it is folded (with
    OIOIOI's styles, the system-admin panel is folded until clicked)."""
    link = menu_link(page, text)
    if not link.is_visible():
        page.click("#menu a[data-toggle=collapse]:has-text('System Administration')")
        link.wait_for(state="visible")
    follow(page, link)


def post_form(page: Any, url: str, form: dict[str, str]) -> Any:
    """POST from the logged-in browser, with its CSRF token, as a form on the current page would."""
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    return page.request.post(
        url, form={**form, "csrfmiddlewaretoken": token}, headers={"Referer": page.url}
    )


def messages_text(page: Any) -> str:
    """The notices on the page (OIOIOI shows them as ``div.alert``)."""
    return " ".join(page.locator("div.alert").all_inner_texts())


def dead_letter_row(page: Any, text: str) -> Any:
    return page.locator("#result_list tbody tr", has_text=text)


def run_action(page: Any, action: str) -> None:
    """Run a dead-letter action on the rows ticked (OIOIOI's action bar), to its confirmation."""
    page.select_option("select[name=action]", action)
    follow(page, "button[name=index]")


def waiting_dead_letters() -> int:
    return DeadLetter.objects.unsettled().count()


def result_rows(page: Any) -> Any:
    return page.locator("#result_list tbody tr")


# --- the tests ----------------------------------------------------------------------------------


def test_operator_works_the_return_path_from_oioioi_system_admin_menu(page, queues, consumer):
    # Given a job parked by upstream's evaluation manager whose restore function is broken (a
    # bug), its result and a body that is not JSON, both dead-lettered by the real consumer
    # (the job judges a submission of upstream's test fixtures, waiting for three hours)
    call_command("loaddata", *SUBMISSION_FIXTURES, verbosity=0)
    submission = Submission.objects.get()
    sent = park_job(restore=BROKEN_RESTORE, submission_id=submission.pk)
    job_id = sent["job_id"]
    QueuedJob.objects.filter(job_id=job_id).update(
        creation_date=timezone.now() - timedelta(hours=3)
    )
    result = result_for(sent)
    publish(result, queues)
    publish(b"\x80 not json", queues)
    # ... and moved by the consumer from the broker's dead-letter queue into the database
    wait_until(lambda: waiting_dead_letters() == 2, "two dead letters in the database")
    wait_until(lambda: depth(queues, queues.dead_letter_queue) == 0, "the dead-letter queue moved")
    make_user("root", superuser=True)

    # When an OIOIOI superuser logs in, the system-admin menu has the return path's pages
    log_in(page, "root")
    page.goto("/admin/")
    for text in MENU:
        assert menu_link(page, text).count() == 1, text
    shoot(page, "admin-index")

    # The status page: queue depths, the consumer, the dead letters, the oldest WAITING job
    open_from_menu(page, "Return path status")
    assert page.inner_text("#status-dead-letters").startswith("2")
    assert page.inner_text("#status-consumers").strip() == "1"
    assert page.inner_text("#status-results-depth").strip() == "0"
    oldest = page.inner_text("#status-oldest")
    assert job_id in oldest and "3 h" in oldest and f"submission {submission.pk}" in oldest
    assert page.inner_text("#status-stale").startswith("1 ")
    shoot(page, "status")
    # ... whose links lead to upstream's own queued-job pages, which take their filters
    follow(page, "#workers-status a:has-text('Jobs needing attention')")
    assert "/admin/evalmgr/queuedjob/" in page.url
    assert result_rows(page).count() == 1
    assert str(submission.pk) in result_rows(page).first.inner_text()
    shoot(page, "queuedjob-stale")
    page.go_back()
    follow(page, "#workers-status a:has-text('Jobs WAITING for workers')")
    assert result_rows(page).count() == 1
    page.go_back()
    follow(page, f"#status-oldest a:has-text('{job_id}')")
    assert f"/admin/evalmgr/queuedjob/{quote(job_id)}/" in page.url
    assert "queued job" in page.inner_text("#content").lower()

    # The dead letters, from the menu: both, with their reasons and counts; a search by job id
    open_from_menu(page, "Dead letters")
    assert result_rows(page).count() == 2
    assert "undecodable" in page.inner_text("#result_list")
    assert "all (2)" in page.inner_text("#reason-filter")
    failed = dead_letter_row(page, job_id[:20])
    assert failed.count() == 1
    shoot(page, "deadletter-list")
    page.goto("/admin/workers/deadletter/?" + urlencode({"q": job_id}))
    assert result_rows(page).count() == 1
    follow(page, dead_letter_row(page, job_id[:20]).locator("a").first)
    assert "no_such_restore_function" in page.inner_text("#detail-traceback")
    assert f'"job_id": "{job_id}"' in page.inner_text("#detail-body")
    shoot(page, "deadletter-detail")
    assert waiting_dead_letters() == 2

    # The bug is fixed; the operator replays the result, after a confirmation
    saved = SavedEnviron.objects.get(queued_job_id=job_id)
    environ = saved.load_environ()
    environ["restore_environ_func"] = RESTORE
    saved.environ = json.dumps(environ)
    saved.save()
    open_from_menu(page, "Dead letters")
    dead_letter_row(page, job_id[:20]).locator("input[name=_selected_action]").check()
    run_action(page, "replay_selected")
    assert "Replay this message?" in page.inner_text("#confirm-question")
    shoot(page, "deadletter-confirm-replay")
    assert waiting_dead_letters() == 2
    follow(page, "#confirm-yes")
    page.wait_for_selector("body[data-replay-finished=yes]", timeout=60_000)
    assert "Done: 1 of 1 replayed." in page.inner_text("#replay-done")
    shoot(page, "deadletter-after-replay")

    # Then the consumer resumes the job through upstream's delay_environ: the inbox says so, and
    # the run waits in the pending runs for a Celery worker (none runs in this test)
    wait_until(
        lambda: ReceivedResult.objects.filter(job_id=job_id, outcome="resumed").exists(),
        "the replayed result to resume the job",
    )
    assert not SavedEnviron.objects.filter(queued_job_id=job_id).exists()
    assert waiting_dead_letters() == 1
    open_from_menu(page, "Received results")
    assert result_rows(page).count() == 1
    row = result_rows(page).first
    assert result["group_id"] in row.inner_text() and "resumed" in row.inner_text()
    shoot(page, "receivedresult-list")
    # Read-only: OIOIOI's site-wide "delete selected" action (which asks a superuser for no
    # permission) is neither offered nor taken: the inbox row that makes a redelivery harmless stays
    assert page.locator("select[name=action]").count() == 0
    inbox_row = ReceivedResult.objects.get(job_id=job_id)
    response = post_form(
        page,
        "/admin/workers/receivedresult/",
        {"action": "delete_selected", "_selected_action": str(inbox_row.pk), "post": "yes"},
    )
    assert response.ok and ReceivedResult.objects.filter(pk=inbox_row.pk).exists()
    follow(page, row.locator(f"a:has-text('{job_id}')"))
    assert "/admin/evalmgr/queuedjob/" in page.url

    # Pending runs: the resumed job's run, and (written here) one given up after 5 attempts
    PendingRun.objects.create(
        job_id="urn:uuid:given-up", environ=json.dumps({"job_id": "urn:uuid:given-up"}), attempts=5
    )
    open_from_menu(page, "Pending runs")
    assert result_rows(page).count() == PendingRun.objects.count() == 2
    assert job_id in page.inner_text("#result_list")
    assert "given up" in page.locator("#result_list tbody tr", has_text="given-up").inner_text()
    assert page.locator("select[name=action]").count() == 0
    shoot(page, "pendingrun-list")

    # Saved environs: none left for the resumed job
    open_from_menu(page, "Saved environs")
    assert result_rows(page).count() == 0
    shoot(page, "savedenviron-list")

    # Discarding the garbage empties the dead-letter queue
    open_from_menu(page, "Dead letters")
    dead_letter_row(page, "undecodable").locator("input[name=_selected_action]").check()
    run_action(page, "discard_selected")
    assert "Discard" in page.inner_text("#confirm-question")
    follow(page, "#confirm-yes")
    assert "Discarded 1 message" in messages_text(page)
    assert result_rows(page).count() == 0
    assert waiting_dead_letters() == 0
    assert depth(queues, queues.dead_letter_queue) == 0
    shoot(page, "deadletter-empty")


def test_oioioi_lets_every_active_user_into_its_admin_but_only_operators_into_these_pages(
    page, queues
):
    sent = park_job()
    saved = SavedEnviron.objects.get(queued_job_id=sent["job_id"])
    run = PendingRun.objects.create(
        job_id=sent["job_id"], environ=json.dumps({"job_id": sent["job_id"]})
    )
    result = ReceivedResult.objects.create(
        key="GROUP_X",
        message_id="GROUP_X",
        group_id="GROUP_X",
        job_id=sent["job_id"],
        outcome="ignored",
    )
    make_user("contestant")
    make_user("operator", *OPERATOR_PERMISSIONS)
    letter = DeadLetter.objects.create(letter_id="dl-1", reason="failed", body=b"{}", size=2)
    pages = [
        "/admin/workers/deadletterqueue/status/",
        "/admin/workers/deadletter/",
        f"/admin/workers/deadletter/{letter.pk}/change/",
        "/admin/workers/receivedresult/",
        f"/admin/workers/receivedresult/{result.pk}/change/",
        "/admin/workers/pendingrun/",
        f"/admin/workers/pendingrun/{run.pk}/change/",
        "/admin/evalmgr/savedenviron/",
        f"/admin/evalmgr/savedenviron/{saved.pk}/change/",
    ]

    # An active user with no permission gets into OIOIOI's admin site, and is refused every page
    log_in(page, "contestant")
    for url in pages:
        response = page.goto(url)
        assert response.status == 403, url
    shoot(page, "refused-without-permission")
    page.goto("/admin/")
    for text in MENU:
        assert menu_link(page, text).count() == 0, text
    body = f"/admin/workers/deadletter/{letter.pk}/body/"
    assert page.request.get(body).status == 403
    response = post_form(
        page,
        "/admin/workers/deadletter/replay/",
        {"select_across": "1", "upto": str(letter.pk)},
    )
    assert response.status == 403
    assert "CSRF" not in response.text()
    post_form(
        page,
        "/admin/workers/deadletter/",
        {
            "action": "discard_selected",
            "_selected_action": str(letter.pk),
            "select_across": "0",
            "post": "yes",
            "upto": str(letter.pk),
        },
    )
    assert waiting_dead_letters() == 1

    # An operator who is not a superuser (OIOIOI shows its system-admin menu to superusers only)
    # is let into every page by its permissions
    page.context.clear_cookies()
    log_in(page, "operator")
    for url in pages:
        response = page.goto(url)
        assert response.status == 200, url
    download = page.request.get(body)
    assert download.status == 200 and download.body() == b"{}"
    page.goto("/admin/workers/deadletterqueue/status/")
    assert page.locator("#workers-status").is_visible()
    assert sent["job_id"] in page.inner_text("#status-oldest")
    shoot(page, "status-operator")
