"""Fixtures start real servers: embedded Redis, PostgreSQL/RabbitMQ/Redis when TEST_*_URL is set.

A server whose URL is set must answer (the test fails, never skips); without the URL the test
is skipped with a reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from tasklab.embedded import EmbeddedRedis
from tasklab.settings import Settings
from tests.support.worker import WorkerProcess

# Fixtures that start a worker subprocess: their tests are marked ``worker`` (``make mutate``
# leaves them out; the subprocess would run the unmutated package).
WORKER_FIXTURES = frozenset({"worker_factory", "live_settings"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.worker)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests build settings explicitly; the caller's TASKLAB_* and URLs must not leak in."""
    for name in list(os.environ):
        if name.startswith("TASKLAB_") or name in (
            "REDIS_URL",
            "BROKER_URL",
            "DATABASE_URL",
            "RESULT_BACKEND",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(embedded_redis: EmbeddedRedis) -> str:
    """The session's embedded Redis, flushed for each test."""
    client = redis.Redis.from_url(embedded_redis.url)
    client.flushall()
    client.close()
    return embedded_redis.url


def required_url(name: str) -> str:
    url = os.environ.get(name)
    if not url:
        pytest.skip(f"{name} is not set (make test sets it when the server answers)")
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the TEST_POSTGRES_URL server, dropped at the end of the session."""
    base = required_url("TEST_POSTGRES_URL")
    name = f"tasklab_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        base.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """Each test using this runs on SQLite (None = embedded default) and on PostgreSQL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    _reset_postgres(url)
    return url


def _reset_postgres(url: str) -> None:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    """Settings on the embedded Redis and SQLite under the test's own directory."""
    return Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=redis_url,
        worker_concurrency=2,
        lease_s=5,
        reaper_interval_s=0.5,
    )


@pytest.fixture
def worker_factory(settings: Settings) -> Iterator[type[WorkerProcess]]:
    started: list[WorkerProcess] = []

    class Factory(WorkerProcess):
        def spawn(self) -> WorkerProcess:
            started.append(self)
            return super().spawn()

    yield Factory
    for w in started:
        w.stop()
