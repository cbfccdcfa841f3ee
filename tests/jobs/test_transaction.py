"""``job.transaction()``: effects commit when the block ends, with a fenced mark; the write
gate is not held after the block; progress() inside the block does not wait for itself; a
worker lost after the commit leaves the job SUCCEEDED, never run twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tasklab.database import writing
from tasklab.jobs import JobContext, JobManager, JobStatus, job, store
from tasklab.jobs.execution import Executor
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.records import effects
from tasklab.jobs.recovery import Reaper
from tasklab.settings import Settings
from tests.jobs.conftest import effect_counts
from tests.support.schema import migrated

_seen: dict[str, Any] = {}


@job(name="tests.transaction.progress_inside", bind=True)
def progress_inside(ctx: JobContext) -> str:
    with ctx.transaction() as session:
        session.execute(effects.insert().values(job_id=ctx.id, attempt=1, created_at=0.0))
        started = time.monotonic()
        ctx.progress(1, 2)
        _seen["progress_s"] = time.monotonic() - started
    return "done"


@job(name="tests.transaction.slow_after_the_block", bind=True)
def slow_after_the_block(ctx: JobContext) -> str:
    with ctx.transaction() as session:
        session.execute(effects.insert().values(job_id=ctx.id, attempt=1, created_at=0.0))
    other_wrote = threading.Event()

    def other_writer() -> None:  # another writer of the same database, meanwhile
        with writing(ctx.engine) as conn:
            conn.execute(sa.update(store.jobs).where(sa.false()).values(owner="x"))
        other_wrote.set()

    threading.Thread(target=other_writer, daemon=True).start()
    _seen["other_wrote_meanwhile"] = other_wrote.wait(2.0)
    return "done"


@pytest.fixture
def jm(tmp_path: Path, database_url: str | None, redis_url: str) -> Iterator[JobManager]:
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        database_url=database_url,
        redis_url=redis_url,
        sqlite_busy_timeout_ms=3000,
    )
    migrated(settings)
    manager = JobManager(settings, local_fallback=False)
    yield manager
    manager.close()


def run(jm: JobManager, spec: Any) -> tuple[str, str]:
    prepared = jm.prepare(spec)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
    executor = Executor(
        jm.engine,
        lease_owner="tx-test",
        via="broker",
        default_lease_s=10,
        leases=LeaseKeeper(jm.engine),
        reschedule=lambda *a: None,
    )
    return prepared.id, executor.run(spec, prepared.id).status


def test_progress_inside_the_transaction_does_not_wait_for_its_own_lock(jm: JobManager) -> None:
    job_id, status = run(jm, progress_inside)

    assert status == "succeeded"
    assert _seen["progress_s"] < 1.0  # not the 3 s busy timeout
    done = jm.get(job_id)
    assert (done.status, done.result, done.progress_current) == (JobStatus.SUCCEEDED, "done", 2)
    assert effect_counts(jm) == {job_id: 1}


def test_other_writers_go_ahead_while_the_job_runs_after_its_transaction(
    jm: JobManager,
) -> None:
    job_id, status = run(jm, slow_after_the_block)

    assert status == "succeeded"
    assert _seen["other_wrote_meanwhile"], "the write lock was held after the block ended"
    assert effect_counts(jm) == {job_id: 1}


def test_a_worker_lost_after_the_transaction_committed_leaves_the_job_done(
    jm: JobManager,
) -> None:
    prepared = jm.prepare(progress_inside)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
        claim = store.claim(prepared.id, lease_owner="t", lease_s=-1.0, via="broker", now=0.0)
        assert conn.execute(*claim).first() is not None
    ctx = JobContext(
        id=prepared.id,
        task=progress_inside.name,
        queue="default",
        attempt=1,
        max_attempts=3,
        engine=jm.engine,
        lease_s=10,
    )
    with ctx.transaction() as session:  # committed; then the worker dies
        session.execute(effects.insert().values(job_id=ctx.id, attempt=1, created_at=0.0))
    reaper = Reaper(jm.settings, jm.engine, jm.publisher)

    assert reaper.tick()["lease_expired"] == 1

    done = jm.get(prepared.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempt == 1
    assert "transaction committed" in (done.error or "")
    assert effect_counts(jm) == {prepared.id: 1}
    reaper.close()
