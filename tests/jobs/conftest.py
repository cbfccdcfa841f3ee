from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tasklab.embedded import EmbeddedRedis, free_port
from tasklab.jobs import JobManager
from tasklab.jobs.records import effects
from tasklab.migrations import migrate
from tasklab.settings import Settings
from tests.conftest import _reset_postgres
from tests.support.schema import migrated
from tests.support.worker import WorkerProcess


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, which the test may stop and restart (empty) on its port."""
    server = EmbeddedRedis(tmp_path / "broker", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """As tests/conftest.py's, except that PostgreSQL's schema is left as it was: every
    fixture here makes it fresh with ``migrated`` (tests/support/schema.py), which empties a
    migrated schema instead of dropping it and migrating again."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def job_settings(tmp_path: Path, redis_url: str, database_url: str | None) -> Settings:
    """Migrated settings on the embedded Redis, once on SQLite and once on PostgreSQL."""
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=redis_url,
        database_url=database_url,
        worker_concurrency=2,
        lease_s=4,
        reaper_interval_s=0.3,
        requeue_after_s=2,
        breaker_reset_s=0.5,
    )
    return migrated(settings)


@pytest.fixture
def manager(job_settings: Settings) -> Iterator[JobManager]:
    jm = JobManager(job_settings)
    yield jm
    jm.close()


# Queues the shared worker consumes; tests that must see a job wait use "low" (not consumed).
LIVE_QUEUES = "high,default"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live_settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """One migrated database, one Redis and one real worker shared by a module's tests (per
    backend). The Redis is its own: other tests' workers must not consume its messages."""
    database_url = None
    if request.param == "postgres":
        database_url = request.getfixturevalue("postgres_url")
        _reset_postgres(database_url)
    home = tmp_path_factory.mktemp("live")
    broker = EmbeddedRedis(home / "redis")
    broker.start()
    settings = Settings(
        home_dir=home / ".tasklab",
        redis_url=broker.url,
        database_url=database_url,
        worker_concurrency=2,
        lease_s=4,
        reaper_interval_s=0.3,
        requeue_after_s=30,
        breaker_reset_s=0.5,
    )
    migrate(settings)
    worker = WorkerProcess(settings, queues=LIVE_QUEUES, name="live").start()
    yield settings
    worker.stop()
    broker.stop()


@pytest.fixture
def live(live_settings: Settings) -> Iterator[JobManager]:
    jm = JobManager(live_settings)
    yield jm
    jm.close()


def effect_counts(jm: JobManager) -> dict[str, int]:
    """Effect rows per job id (written only through job.transaction())."""
    with jm.engine.connect() as conn:
        rows = conn.execute(
            sa.select(effects.c.job_id, sa.func.count()).group_by(effects.c.job_id)
        ).all()
    return {job_id: int(n) for job_id, n in rows}


def queue_lists(client: redis.Redis, queue: str) -> list[str]:
    """kombu keeps one list per priority step of a queue (queue, queue:N)."""
    keys = [queue, *(k.decode() for k in client.keys(f"{queue}:*"))]
    return [key for key in keys if client.type(key) == b"list"]


def queued_messages(client: redis.Redis, queue: str) -> list[tuple[str, str, list[Any]]]:
    """(task, message id, positional args) of each message waiting on ``queue``."""
    found = []
    for key in queue_lists(client, queue):
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            assert message["properties"]["body_encoding"] == "base64"
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            found.append((message["headers"]["task"], message["headers"]["id"], args))
    return found
