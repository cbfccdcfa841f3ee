"""What the console's pages show and do, on SQLite and PostgreSQL where the SQL differs."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

import tasklab.lab.probe_jobs  # noqa: F401  (declares the probe jobs a retry looks up)
from tasklab.jobs import JobManager
from tasklab.lab.results import LabResult, write_result
from tasklab.settings import Settings, mask_url
from tests.service.console.conftest import (
    csrf_of,
    insert_jobs,
    queue_cells,
    status_of,
    total_unacked,
)


@pytest.fixture
def console_database(database_url: str | None) -> str | None:
    """Every test here on SQLite and on PostgreSQL: their SQL differs (keys, substr, casts)."""
    return database_url


JOB_LINK = re.compile(r'href="/console/jobs/([0-9a-f]{32})"')


async def walk(client: httpx.AsyncClient, url: str) -> list[str]:
    """Every job id listed from ``url`` on, following the next-page links."""
    seen: list[str] = []
    next_url: str | None = url
    while next_url:
        html = (await client.get(next_url)).text
        seen += JOB_LINK.findall(html)
        found = re.search(r'id="next-page" href="([^"]+)"', html)
        next_url = found.group(1).replace("&amp;", "&") if found else None
    return seen


async def test_the_jobs_list_pages_by_key_through_every_row_once_newest_first(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    now = time.time()
    # 130 rows; pairs share a creation time, so the id must break the tie between pages.
    rows = [{"created_at": now - i // 2} for i in range(130)]
    ids = insert_jobs(console_settings, rows)
    seen = await walk(admin, "/console/jobs")
    assert len(seen) == len(set(seen)) == 130
    # newest first; between equal times the greater id first (the key is (created_at, id))
    expected = sorted(
        zip(ids, (r["created_at"] for r in rows), strict=True), key=lambda p: (p[1], p[0])
    )
    assert seen == [job_id for job_id, _ in reversed(expected)]


async def test_the_jobs_list_filters_by_status_task_queue_owner_and_time(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    now = time.time()
    dead, slow_low, mine, old = insert_jobs(
        console_settings,
        [
            {"status": "DEAD", "error": "boom"},
            {"task": "tasklab.probe_job.sleep", "queue": "low"},
            {"owner": "user:7"},
            {"created_at": now - 7200},
        ],
    )
    assert await walk(admin, "/console/jobs?status=DEAD") == [dead]
    assert await walk(admin, "/console/jobs?task=tasklab.probe_job.sleep&queue=low") == [slow_low]
    assert await walk(admin, "/console/jobs?queue=high") == []
    assert await walk(admin, "/console/jobs?owner=user:7") == [mine]
    assert await walk(admin, "/console/jobs?until=-1h") == [old]
    assert old not in await walk(admin, "/console/jobs?since=-30m")
    bad = await admin.get("/console/jobs?since=yesterday")
    assert bad.status_code == 400 and "since" in bad.text


async def test_a_job_page_shows_its_arguments_attempt_error_traceback_and_lease(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    (job_id,) = insert_jobs(
        console_settings,
        [
            {
                "status": "STARTED",
                "args": [41],
                "kwargs": {"who": "<script>"},
                "attempt": 2,
                "error": "ValueError: first try",
                "traceback": "Traceback (most recent call last):\n  File x",
                "lease_owner": "w1@host:123",
                "lease_expires_at": time.time() + 30,
                "progress_current": 3,
                "progress_total": 10,
                "finished_at": None,
            }
        ],
    )
    html = (await admin.get(f"/console/jobs/{job_id}")).text
    for text in (
        "41",
        "&lt;script&gt;",
        "2 of 3",
        "ValueError: first try",
        "Traceback",
        "w1@host:123",
        "3/10",
    ):
        assert text in html, text
    assert "<script>" not in html.split("</header>", 1)[1]  # arguments are escaped
    assert 'hx-get="/console/fragments/jobs/' in html  # live while it runs
    fragment = await admin.get(f"/console/fragments/jobs/{job_id}")
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert (await admin.get("/console/jobs/nope")).status_code == 404


async def test_dead_letters_are_grouped_by_task_and_error(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    insert_jobs(
        console_settings,
        [{"status": "DEAD", "error": "ConnectionError: db down"}] * 3
        + [{"status": "DEAD", "error": "KeyError: 'sku'"}]
        + [{"status": "DEAD", "task": "tasklab.probe_job.fail", "error": "RuntimeError: x"}],
    )
    html = (await admin.get("/console/dead")).text
    assert html.count('class="group"') == 3
    assert "tasklab.probe_job.noop · 3 dead" in html
    assert "tasklab.probe_job.noop · 1 dead" in html and "tasklab.probe_job.fail · 1 dead" in html


async def test_retrying_a_dead_group_asks_first_then_requeues_each_job_and_logs_who_did_it(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    ids = insert_jobs(console_settings, [{"status": "DEAD", "error": "boom"}] * 3)
    (other,) = insert_jobs(console_settings, [{"status": "DEAD", "error": "other"}])
    csrf = csrf_of((await admin.get("/console/dead")).text)
    form = {"csrf": csrf, "task": "tasklab.probe_job.noop", "error": "boom"}
    ask = await admin.post("/console/dead/retry", data=form)
    assert ask.status_code == 200 and 'id="confirm"' in ask.text
    assert {status_of(console_settings, i) for i in ids} == {"DEAD"}  # nothing done yet
    done = await admin.post("/console/dead/retry", data=form | {"confirm": "yes"})
    assert done.status_code == 303 and "count=3" in done.headers["location"]
    assert {status_of(console_settings, i) for i in ids} <= {"PENDING", "QUEUED"}
    assert status_of(console_settings, other) == "DEAD"
    log = (await admin.get("/console/actions")).text
    assert re.search(r"<td>admin</td><td>job.retry</td><td>3 jobs: [^<]*</td><td[^>]*>3</td>", log)


async def test_discarding_a_selection_takes_only_those_jobs_out_of_the_dead_letters(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    first, second, kept = insert_jobs(console_settings, [{"status": "DEAD", "error": "e"}] * 3)
    csrf = csrf_of((await admin.get("/console/dead")).text)
    form = {"csrf": csrf, "job_id": [first, second], "confirm": "yes"}
    done = await admin.post("/console/dead/discard", data=form)
    assert done.status_code == 303
    assert [status_of(console_settings, i) for i in (first, second, kept)] == [
        "CANCELLED",
        "CANCELLED",
        "DEAD",
    ]


async def test_retrying_a_job_that_is_not_dead_is_refused_and_said_so(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    (job_id,) = insert_jobs(console_settings, [{"status": "SUCCEEDED"}])
    csrf = csrf_of((await admin.get(f"/console/jobs/{job_id}")).text)
    done = await admin.post(f"/console/jobs/{job_id}/retry", data={"csrf": csrf, "confirm": "yes"})
    assert "count=0" in done.headers["location"] and "failed=1" in done.headers["location"]
    assert status_of(console_settings, job_id) == "SUCCEEDED"


async def test_the_overview_shows_each_queue_the_broker_masked_and_refreshes_while_visible(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    insert_jobs(console_settings, [{"status": "QUEUED", "finished_at": None}])
    html = (await admin.get("/console")).text
    for queue in ("high", "default", "low", "data_sync", "scheduled"):
        assert f'data-queue="{queue}"' in html
    assert str(mask_url(console_settings.effective_broker_url)) in html
    assert 'hx-trigger="every 2s [!document.hidden]"' in html
    assert "circuit breaker" in html and 'id="breaker">closed' in html


async def test_on_redis_the_overview_splits_waiting_messages_by_priority_and_no_consumers(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    """Redis keeps a list per priority and knows no consumers (RabbitMQ the other way round:
    tests/service/console/test_rabbitmq.py)."""
    jm = JobManager(console_settings.model_copy(update={"bundle_max": 1}), local_fallback=False)
    try:
        for priority in (9, 9, 5, 0):
            jm.submit("tasklab.probe_job.noop", queue="default", priority=priority)
        assert jm.flush(timeout_s=30)
    finally:
        jm.close()
    deadline = time.monotonic() + 20
    while (cells := queue_cells((await admin.get("/console")).text, "default"))["depth"] != "4":
        assert time.monotonic() < deadline, f"the overview never showed 4 messages: {cells}"
        await asyncio.sleep(0.3)
    assert cells["by-priority"] == " · ".join(["2", *"000", "1", *"0000", "1"])  # 9..0
    assert cells["unacked"] == "0"
    assert cells["consumers"] == "\u2013"  # Redis cannot tell: unknown, not 0
    assert total_unacked((await admin.get("/console")).text) == "0"


async def test_the_lab_lists_results_opens_one_and_compares_two(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    old = write_result(
        LabResult("bench", figures={"jobs_per_s": 100.0}, started_at=1.0), console_settings
    )
    new = write_result(
        LabResult("bench", figures={"jobs_per_s": 50.0}, started_at=2.0), console_settings
    )
    listing = (await admin.get("/console/lab")).text
    assert old.name in listing and new.name in listing
    assert (await admin.get(f"/console/lab/runs/{new.name}")).status_code == 200
    compared = await admin.get(f"/console/lab/compare?old={old.name}&new={new.name}")
    assert compared.status_code == 200 and "-50" in compared.text
    assert (await admin.get("/console/lab/runs/..%2Fsecret.json")).status_code == 404


async def test_dead_jobs_listed_by_the_filter_can_be_selected_and_retried_from_the_list(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    first, second = insert_jobs(console_settings, [{"status": "DEAD", "error": "e"}] * 2)
    listing = (await admin.get("/console/jobs?status=DEAD")).text
    assert f'name="job_id" value="{first}"' in listing
    assert 'name="job_id"' not in (await admin.get("/console/jobs")).text  # only for DEAD
    form = {"csrf": csrf_of(listing), "job_id": [second], "confirm": "yes"}
    assert (await admin.post("/console/dead/retry", data=form)).status_code == 303
    assert status_of(console_settings, first) == "DEAD"
    assert status_of(console_settings, second) in {"PENDING", "QUEUED"}


async def test_a_job_page_lists_its_earlier_attempts_where_they_ran_and_how_they_ended(
    admin: httpx.AsyncClient, console_settings: Settings
) -> None:
    from tasklab.database import make_engine
    from tasklab.jobs import store

    (job_id,) = insert_jobs(console_settings, [{"status": "SUCCEEDED", "attempt": 3}])
    engine = make_engine(console_settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                store.record_attempt(
                    job_id,
                    1,
                    outcome="failed",
                    ran_on="w1@host:11",
                    started_at=time.time() - 9,
                    now=time.time() - 8,
                    error="ValueError: first try",
                    tb="Traceback (most recent call last):\n  File a",
                )
            )
            conn.execute(
                store.record_attempt(
                    job_id, 2, outcome="lost", ran_on="w2@host:22", started_at=None, now=time.time()
                )
            )
    finally:
        engine.dispose()
    html = (await admin.get(f"/console/jobs/{job_id}")).text
    table = html.split('id="attempts"', 1)[1].split("</table>", 1)[0]
    assert table.index("w1@host:11") < table.index("w2@host:22")  # oldest first
    for text in ("failed", "lost", "ValueError: first try", "Traceback"):
        assert text in table, text
    (plain,) = insert_jobs(console_settings, [{"status": "SUCCEEDED"}])
    assert 'id="attempts"' not in (await admin.get(f"/console/jobs/{plain}")).text
