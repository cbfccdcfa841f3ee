"""Fixtures for the console: seeded settings with one viewer, the app in-process (ASGI, its
lifespan run) with a client that keeps cookies, logged in as the admin or the viewer, and job
rows written straight into the table (any status, any age)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tasklab.database import make_engine
from tasklab.jobs.records import jobs
from tasklab.service.app import create_app
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.service.conftest import SEED, Account, make_settings, read_tokens
from tests.support.schema import migrated

VIEWER = "user-00001"


@pytest.fixture
def console_database() -> str | None:
    """SQLite under the test's folder; a module overrides it to run on every database."""
    return None


@pytest.fixture
def console_settings(tmp_path: Path, redis_url: str, console_database: str | None) -> Settings:
    settings = make_settings(tmp_path, redis_url, console_database, console_viewers=[VIEWER])
    seed(migrated(settings), **SEED)  # seed's own migration then has nothing to do
    return settings


@pytest.fixture
def people(console_settings: Settings) -> dict[str, Account]:
    """admin, viewer (named in console_viewers) and stranger (neither)."""
    accounts = {a.name: a for a in read_tokens(console_settings.home_dir / "tokens.jsonl")}
    return {
        "admin": accounts["admin"],
        "viewer": accounts[VIEWER],
        "stranger": accounts["user-00002"],
    }


@pytest.fixture
async def anonymous(console_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(console_settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        yield client


async def log_in(client: httpx.AsyncClient, token: str) -> httpx.AsyncClient:
    response = await client.post("/console/login", data={"token": token, "next": "/console"})
    assert response.status_code == 303, response.text
    return client


@pytest.fixture
async def admin(anonymous: httpx.AsyncClient, people: dict[str, Account]) -> httpx.AsyncClient:
    return await log_in(anonymous, people["admin"].token)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def insert_jobs(settings: Settings, rows: list[dict[str, Any]]) -> list[str]:
    """Job rows as given (defaults fill the rest); their ids."""
    now = time.time()
    full = [
        {
            "id": uuid.uuid4().hex,
            "task": "tasklab.probe_job.noop",
            "args": [],
            "kwargs": {},
            "queue": "default",
            "priority": 5,
            "owner": "",
            "status": "SUCCEEDED",
            "attempt": 1,
            "max_attempts": 3,
            "created_at": now,
            "finished_at": now,
        }
        | row
        for row in rows
    ]
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            for row in full:  # rows may name different columns
                conn.execute(jobs.insert().values(**row))
    finally:
        engine.dispose()
    return [r["id"] for r in full]


def status_of(settings: Settings, job_id: str) -> str:
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            return str(conn.execute(jobs.select().where(jobs.c.id == job_id)).one().status)
    finally:
        engine.dispose()


def queue_cells(html: str, queue: str) -> dict[str, str]:
    """The overview's cells of ``queue``'s row by their class: waiting, depth, by-priority,
    unacked, consumers, consumed, paused."""
    row = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', html, re.S)
    assert row, f"no row for queue {queue!r}"
    cells = {}
    for classes, text in re.findall(r'<td class="([^"]*)">(.*?)</td>', row.group(1), re.S):
        names = [c for c in classes.split() if c not in ("num", "meta", "bad")]
        if names:  # the figures that are "num" alone are not read here
            cells[names[0]] = text.strip()
    return cells


def total_unacked(html: str) -> str:
    found = re.search(r'<span id="unacked">([^<]*)</span>', html)
    assert found, "no unacked total on the overview"
    return found.group(1).strip()
