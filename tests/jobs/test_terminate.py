"""``cancel(terminate=True)`` ends exactly the job asked for: in a bundle, the jobs before and
after it still run once. A real worker (prefork pool) on a Redis of the test's own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tasklab.embedded import EmbeddedRedis
from tasklab.jobs import JobManager, JobStatus
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.support.schema import migrated


@pytest.fixture
def settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    s = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=broker.url,
        database_url=database_url,
        worker_concurrency=1,
        reaper_interval_s=0.5,
        requeue_after_s=120,  # recovery by re-publishing is not what this test is about
    )
    migrated(s)
    return s


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_terminate_ends_only_the_bundled_job_asked_for(settings: Settings, worker_factory) -> None:
    jm = JobManager(settings, local_fallback=False)
    prepared = [jm.prepare(probe_jobs.sleep, 1.5, steps=15) for _ in range(3)]
    for p in prepared:
        jm._insert(p)
    jm._dispatch_many([(p.spec, p.values, 0.0) for p in prepared])  # one bundle of three
    first, second, third = (p.id for p in prepared)
    assert len({jm.get(i).status for i in (first, second, third)}) == 1
    worker_factory(settings, concurrency=1).start()

    wait_for(lambda: jm.get(second).status is JobStatus.STARTED, 30, "the second job to start")
    jm.cancel(second, terminate=True)

    wait_for(lambda: all(jm.get(i).done for i in (first, second, third)), 30, "the bundle")
    assert jm.get(first).status is JobStatus.SUCCEEDED
    assert jm.get(second).status is JobStatus.CANCELLED
    assert jm.get(third).status is JobStatus.SUCCEEDED
    assert jm.get(third).attempt == 1
    jm.close()
