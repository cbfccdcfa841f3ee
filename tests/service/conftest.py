"""Fixtures for the reference service: seeded databases, the app in-process (ASGI, lifespan
run) or served by a real uvicorn subprocess, tokens, and a SQL statement counter."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from tasklab.database import make_engine
from tasklab.jobs import JobManager
from tasklab.processes import die_with_parent, kill_tree
from tasklab.service.app import create_app
from tasklab.service.domain.models import Order, OrderStatus
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.support.schema import migrated
from tests.support.worker import child_env

SEED = {"users": 4, "products": 6, "stock": 100, "points": 1000}


@dataclass(frozen=True)
class Account:
    user_id: int
    name: str
    token: str
    admin: bool

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def read_tokens(path: Path) -> list[Account]:
    return [
        Account(d["user_id"], d["name"], d["token"], d["admin"])
        for d in map(json.loads, path.read_text().splitlines())
    ]


# Limits high enough that only the tests of the limits meet them (tests/service/test_rate_limits.py
# sets its own): the oversell test alone sends 1,000 orders from 19 users at once.
TEST_LIMITS: dict[str, Any] = {
    "rate_limit_per_token": "100000/minute",
    "rate_limit_per_address": "1000000/minute",
    "rate_limit_failed_auth_per_address": "100000/minute",
    "orders_in_flight_max": 10_000,
    "data_sync_jobs_in_flight_max": 10_000,
}


def make_settings(
    tmp_path: Path, redis_url: str, database_url: str | None = None, **extra: Any
) -> Settings:
    extra = {**TEST_LIMITS, **extra}
    return Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=redis_url,
        database_url=database_url,
        worker_concurrency=2,
        lease_s=5,
        reaper_interval_s=0.5,
        requeue_after_s=3,
        **extra,
    )


@pytest.fixture
def shop_settings(tmp_path: Path, redis_url: str) -> Settings:
    """SQLite under the test's directory, embedded Redis; seeded."""
    settings = make_settings(tmp_path, redis_url)
    seed(migrated(settings), **SEED)  # seed's own migration then has nothing to do
    return settings


@pytest.fixture
def shop_settings_any_db(tmp_path: Path, redis_url: str, database_url: str | None) -> Settings:
    """Seeded, once on SQLite and once on PostgreSQL."""
    settings = make_settings(tmp_path, redis_url, database_url)
    seed(migrated(settings), **SEED)  # seed's own migration then has nothing to do
    return settings


@pytest.fixture
def accounts(shop_settings: Settings) -> list[Account]:
    """The seeded users, regular ones first; the last one is the admin."""
    return read_tokens(shop_settings.home_dir / "tokens.jsonl")


@pytest.fixture
def app(shop_settings: Settings) -> FastAPI:
    return create_app(shop_settings)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process over ASGI, with its lifespan running."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


@pytest.fixture
def jobs(shop_settings: Settings) -> Iterator[JobManager]:
    jm = JobManager(shop_settings, local_fallback=False)
    yield jm
    jm.close()


def count_rows(settings: Settings, table: Any, *where: Any) -> int:
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(table).where(*where)
                ).scalar_one()
            )
    finally:
        engine.dispose()


async def wait_settled(settings: Settings, *, timeout_s: float = 90.0) -> None:
    """Poll (with backoff) until no order is pending; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while pending := count_rows(settings, Order, Order.status == OrderStatus.PENDING.value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{pending} order(s) still pending after {timeout_s} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


class StatementCounter:
    """Counts SQL statements sent through an engine (``with counter: ...``)."""

    def __init__(self, sync_engine: sa.Engine) -> None:
        self.engine = sync_engine
        self.count = 0

    def _on_execute(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> StatementCounter:
        self.count = 0
        sa.event.listen(self.engine, "before_cursor_execute", self._on_execute)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._on_execute)


# --- a real HTTP server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiServer:
    """``uvicorn tasklab.service.app:create_app_from_env`` in a subprocess on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = settings.home_dir / "api.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_s: float = 30.0) -> ApiServer:
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "tasklab.service.app:create_app_from_env",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                env=child_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self._wait_ready(wait_s)
        return self

    def _wait_ready(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"API exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"API not ready after {wait_s} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None:
            kill_tree(self.process.pid, timeout_s=10)
            self.process.wait()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


@pytest.fixture
def api_server_factory() -> Iterator[type[ApiServer]]:
    started: list[ApiServer] = []

    class Factory(ApiServer):
        def start(self, *, wait_s: float = 30.0) -> ApiServer:
            started.append(self)
            return super().start(wait_s=wait_s)

    yield Factory
    for server in started:
        server.stop()
