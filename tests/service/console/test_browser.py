"""The console in a real browser (Playwright driving the system Chromium) against a real API
server and worker: what an operator does at the console, and what it refuses.

The screenshots it takes are docs/console.md's (docs/console/*.png) when
``TASKLAB_CONSOLE_SHOTS=docs`` is set (`make console-shots`); otherwise they go to the temp
folder, so a test run leaves the checkout as it found it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

import tasklab.lab.probe_jobs  # noqa: F401  (declares the probe jobs submitted here)
from tasklab.jobs import JobManager
from tasklab.jobs.records import JobStatus
from tasklab.settings import Settings
from tests.service.conftest import Account, ApiServer
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS_SHOTS = Path(__file__).resolve().parents[3] / "docs" / "console"
SHOTS = (
    DOCS_SHOTS
    if os.environ.get("TASKLAB_CONSOLE_SHOTS") == "docs"
    else Path(tempfile.gettempdir()) / "tasklab-console-shots"
)
WAITING_JOBS = 24
UI_TIMEOUT_MS = 20_000  # the overview refreshes every 2 s; the worker drains in a few


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def stack(
    console_settings: Settings, api_server_factory: type[ApiServer]
) -> Iterator[tuple[str, JobManager]]:
    """The API (console included) and one worker on the same SQLite and Redis."""
    worker = WorkerProcess(console_settings, concurrency=2, name="w1")
    server = api_server_factory(console_settings)
    jobs = JobManager(console_settings, local_fallback=False)
    # Started together (each spends seconds importing), from threads that outlive them: a
    # child started by a thread is stopped when that thread ends (die_with_parent).
    pool = ThreadPoolExecutor(2)
    try:
        for started in [pool.submit(worker.start), pool.submit(server.start)]:
            started.result()
        yield server.url, jobs
    finally:
        jobs.close()
        worker.stop()
        server.stop()
        pool.shutdown()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


# A cell of the "default" row, in the page's JavaScript: cell("depth").
CELL = """((c) => document.querySelector('tr[data-queue="default"] td.' + c).textContent.trim())("""


def cell_of(page: Page, queue: str, column: str) -> str:
    return page.locator(f'tr[data-queue="{queue}"] td.{column}').inner_text().strip()


def set_hidden(page: Page, hidden: bool) -> None:
    """What a browser says of a background tab (headless Chromium never hides its page)."""
    page.evaluate(
        "(h) => Object.defineProperty(document, 'hidden', {configurable: true, get: () => h})",
        hidden,
    )


def confirm(page: Page) -> None:
    expect(page.locator("h1")).to_contain_text("Confirm")
    page.click("#confirm")


def test_an_operator_logs_in_watches_a_queue_fill_and_drain_and_retries_a_dead_job(
    browser: Browser, stack: tuple[str, JobManager], people: dict[str, Account]
) -> None:
    url, jobs = stack
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)

    page.goto(f"{url}/console")  # no session: the login form, coming back here after it
    expect(page).to_have_url(f"{url}/console/login?next=/console")
    shot(page, "login")
    page.fill('input[name="token"]', people["admin"].token)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator('tr[data-node^="w1@"]')).to_be_visible()

    # While the tab is hidden the overview asks nothing; once visible again it refreshes.
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/fragments/overview" in r.url else None)
    set_hidden(page, True)
    page.wait_for_timeout(1000)  # a refresh already on its way may still be reported
    asked.clear()
    page.wait_for_timeout(3000)  # a refresh period and a half
    assert asked == []
    with page.expect_request(lambda r: "/fragments/overview" in r.url):
        set_hidden(page, False)

    # Pause "default" on every node, fill it while nobody consumes it, then resume.
    page.locator('tr[data-queue="default"] form[action$="/pause"] button').click()
    confirm(page)
    expect(page.locator('tr[data-queue="default"] td.paused')).to_contain_text("w1@")
    for _ in range(WAITING_JOBS):
        jobs.submit("tasklab.probe_job.sleep", 0.15, queue="default")
    # The overview refreshes itself (no reload): the jobs wait, in one or more messages
    # (jobs submitted together ride in bundles).
    page.wait_for_function(
        f"""() => Number(cell("waiting")) >= {WAITING_JOBS} && Number(cell("depth")) > 0""".replace(
            "cell(", CELL
        )
    )
    shot(page, "overview")
    page.locator('tr[data-queue="default"] form[action$="/resume"] button').click()
    confirm(page)
    page.wait_for_function(
        """() => cell("waiting") === "0" && cell("depth") === "0" """.replace("cell(", CELL)
    )
    assert cell_of(page, "default", "paused") == "\u2013"  # consumed again by every node

    # Grow the worker's pool by one process: the overview shows it once the node has
    # started it (a second or so) and answered the next poll.
    node = page.locator('tr[data-node^="w1@"]')
    processes = int(node.locator("td.concurrency").inner_text())
    node.locator('form[action$="/grow"] button').click()
    confirm(page)
    expect(node.locator("td.concurrency")).to_have_text(str(processes + 1))

    page.goto(f"{url}/console/jobs?queue=default")
    expect(page.locator("#jobs tbody tr")).to_have_count(WAITING_JOBS)
    shot(page, "jobs")

    # A job that fails all its attempts is a dead letter; retried from its page, it succeeds.
    doomed = jobs.submit("tasklab.probe_job.effect", fail_first=5)
    assert jobs.wait(doomed.id, timeout_s=30).status is JobStatus.DEAD
    page.goto(f"{url}/console/dead")
    expect(page.locator("section.group")).to_contain_text("tasklab.probe_job.effect")
    shot(page, "dead-letters")
    page.click(f'a[href="/console/jobs/{doomed.id}"]')
    expect(page.locator("#status")).to_have_text("DEAD")
    expect(page.locator("#error")).to_contain_text("planned failure on attempt 5")
    shot(page, "job-dead")
    page.click("#retry")
    shot(page, "confirm")
    confirm(page)
    expect(page.locator("#status")).to_have_text("SUCCEEDED")  # the live part, refreshed
    shot(page, "job-retried")
    assert jobs.get(doomed.id).status is JobStatus.SUCCEEDED

    page.goto(f"{url}/console/actions")
    log = page.locator("#actions tbody")
    for action in ("queue.pause", "queue.resume", "pool.grow", "job.retry"):
        expect(log).to_contain_text(action)
    shot(page, "action-log")

    # Refused: a visit without a session, and a POST without the session's CSRF token.
    stranger = browser.new_page()
    stranger.goto(f"{url}/console/dead")
    expect(stranger).to_have_url(f"{url}/console/login?next=/console/dead")
    forged = page.request.post(f"{url}/console/jobs/{doomed.id}/cancel", form={"confirm": "yes"})
    assert forged.status == 403 and "CSRF" in forged.text()
    cross_site = stranger.request.post(f"{url}/console/dead/retry", form={"job_id": doomed.id})
    assert cross_site.status == 401
