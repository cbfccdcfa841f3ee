"""``tasklab console-bench``: how long the console's pages take with many job rows.

It fills a fresh database (SQLite in a temporary folder, or the PostgreSQL given) with
``rows`` job records shaped like a busy deployment's (mostly finished, a few percent dead
with a score of distinct errors, some waiting; tasks, queues and owners spread out, creation
times over the last ``days``), then asks each page ``repeat`` times through the app in this
process (ASGI: the server's whole work, no network) as the admin, and writes a lab result.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console

from tasklab.celery_app import QUEUES
from tasklab.database import make_engine
from tasklab.jobs.records import jobs
from tasklab.lab.errors import LabError
from tasklab.lab.noise import CpuWatch
from tasklab.lab.results import LabResult, print_result, write_result
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings, mask_url

BATCH_ROWS = 10_000
TASKS = tuple(f"bench.task_{i}" for i in range(8))
# status -> share of the rows; the rest SUCCEEDED
SHARES = {"DEAD": 0.04, "QUEUED": 0.01, "RETRYING": 0.005, "STARTED": 0.002, "CANCELLED": 0.01}
ERRORS = tuple(f"RuntimeError: failure kind {i} (upstream answered {500 + i})" for i in range(20))


def _status(rng: random.Random) -> str:
    x = rng.random()
    for status, share in SHARES.items():
        if x < share:
            return status
        x -= share
    return "SUCCEEDED"


def job_rows(count: int, *, now: float, days: float, seed_: int = 7) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed_)
    span_s = days * 86400
    for _ in range(count):
        status = _status(rng)
        created = now - rng.random() * span_s
        final = status in ("SUCCEEDED", "DEAD", "CANCELLED")
        yield {
            "id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "task": rng.choice(TASKS),
            "args": [],
            "kwargs": {"n": rng.randrange(1000)},
            "queue": rng.choice(QUEUES),
            "priority": rng.randrange(10),
            "owner": f"user:{rng.randrange(1, 1001)}",
            "status": status,
            "attempt": 3 if status == "DEAD" else 1,
            "max_attempts": 3,
            "error": rng.choice(ERRORS) if status == "DEAD" else None,
            "created_at": created,
            "queued_at": created + 0.01,
            "started_at": created + 0.05 if status != "QUEUED" else None,
            "finished_at": created + rng.random() * 5 if final else None,
        }


def fill(settings: Settings, rows: int, *, days: float, console: Console) -> float:
    """Insert the rows in batches; the seconds it took."""
    engine = make_engine(settings)
    started = time.perf_counter()
    batch: list[dict[str, Any]] = []
    try:
        for row in job_rows(rows, now=time.time(), days=days):
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                _insert(engine, batch)
                batch = []
        if batch:
            _insert(engine, batch)
        # Fresh statistics and (PostgreSQL) visibility map, as autovacuum keeps a live
        # database's: index-only scans need the latter.
        vacuum = "VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(vacuum))
    finally:
        engine.dispose()
    took = time.perf_counter() - started
    console.print(f"filled {rows:,} job rows in {took:.1f} s")
    return took


def _insert(engine: sa.Engine, batch: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(jobs.insert(), batch)


async def time_pages(settings: Settings, token: str, *, repeat: int) -> dict[str, list[float]]:
    """page name -> each request's milliseconds (after one untimed warm-up)."""
    from tasklab.service.app import create_app

    app = create_app(settings)
    headers = {"Authorization": f"Bearer {token}"}
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as c,
    ):
        pages = await _pages(c)
        timings: dict[str, list[float]] = {}
        for name, url in pages.items():
            await _get(c, url)
            timings[name] = [await _get(c, url) for _ in range(repeat)]
    return timings


async def _pages(c: httpx.AsyncClient) -> dict[str, str]:
    first = (await c.get("/console/jobs")).text
    after = first.split('id="next-page" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    job_id = first.split('href="/console/jobs/', 1)[1].split('"', 1)[0]
    return {
        "overview": "/console",
        "jobs": "/console/jobs",
        "jobs_next_page": after,
        "jobs_dead": "/console/jobs?status=DEAD",
        "jobs_task": f"/console/jobs?task={TASKS[3]}",
        "jobs_queue": "/console/jobs?queue=low",
        "jobs_owner": "/console/jobs?owner=user:7",
        "jobs_task_status_old": f"/console/jobs?task={TASKS[1]}&status=DEAD&until=-20d",
        "job": f"/console/jobs/{job_id}",
        "dead_letters": "/console/dead",
    }


async def _get(c: httpx.AsyncClient, url: str) -> float:
    started = time.perf_counter()
    response = await c.get(url)
    took_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    return took_ms


def run_console_bench(
    settings: Settings, *, rows: int, repeat: int, days: float, console: Console
) -> LabResult:
    result = LabResult("console-bench", params={"rows": rows, "repeat": repeat, "days": days})
    with tempfile.TemporaryDirectory(prefix="tasklab-console-bench-") as tmp:
        bench = settings.model_copy(update={"home_dir": Path(tmp)})
        if bench.database_url is None:
            bench = bench.model_copy(update={"database_url": f"sqlite:///{tmp}/bench.db"})
        result.servers["database"] = str(mask_url(bench.sync_database_url))
        report = seed(bench, users=2, products=1, stock=1, points=1, reset=True)
        _refuse_existing_jobs(bench)
        token = _admin_token(report.tokens_out)
        fill_s = fill(bench, rows, days=days, console=console)
        # The machine's other load is read over the timed requests (what it can disturb).
        result.cpu = CpuWatch()
        timings = asyncio.run(time_pages(bench, token, repeat=repeat))
        result.record_noise()
    result.add_figures("fill", {"seconds": round(fill_s, 2)})
    for name, samples in timings.items():
        ordered = sorted(samples)
        result.add_figures(
            name,
            {
                "p50_ms": round(statistics.median(ordered), 2),
                "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 2),
                "max_ms": round(ordered[-1], 2),
            },
        )
    write_result(result, settings)
    print_result(result, console, path=result.path)
    return result


def _refuse_existing_jobs(settings: Settings) -> None:
    """Rows are only ever added: a database that holds jobs already is someone's."""
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            present = conn.execute(sa.select(jobs.c.id).limit(1)).first()
    finally:
        engine.dispose()
    if present is not None:
        raise LabError(
            f"{mask_url(settings.sync_database_url)} holds job rows already: give the bench "
            "an empty database (it adds rows and never deletes any)"
        )


def _admin_token(tokens_out: Path) -> str:
    for line in tokens_out.read_text().splitlines():
        entry = json.loads(line)
        if entry["admin"]:
            return str(entry["token"])
    raise RuntimeError(f"no admin token in {tokens_out}")
