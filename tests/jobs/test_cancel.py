"""A cancel ends CANCELLED on every path: a job that then raises, a job whose worker is then
lost, a job left waiting with a cancel by an older version. Real SQL, in-process executors."""

from __future__ import annotations

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
from tasklab.jobs.recovery import Reaper
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.support.schema import migrated

_managers: list[JobManager] = []


@job(name="tests.cancel.cancels_itself_then_raises", max_attempts=3, bind=True, backoff_s=0.01)
def cancels_itself_then_raises(ctx: JobContext) -> None:
    """Someone cancels the job (without terminate) while it runs; then it fails."""
    _managers[-1].cancel(ctx.id)
    raise RuntimeError("failed after the cancel")


@pytest.fixture
def jm(tmp_path: Path, database_url: str | None, redis_url: str) -> Iterator[JobManager]:
    settings = Settings(
        home_dir=tmp_path / ".tasklab", database_url=database_url, redis_url=redis_url
    )
    migrated(settings)
    manager = JobManager(settings, local_fallback=False)
    _managers.append(manager)
    yield manager
    _managers.remove(manager)
    manager.close()


def inserted(jm: JobManager, spec: Any) -> str:
    prepared = jm.prepare(spec)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
    return prepared.id


def executor(jm: JobManager) -> Executor:
    return Executor(
        jm.engine,
        lease_owner="cancel-test",
        via="broker",
        default_lease_s=5,
        leases=LeaseKeeper(jm.engine),
        reschedule=lambda *a: None,
    )


def test_a_job_cancelled_while_it_runs_that_then_raises_ends_cancelled(jm: JobManager) -> None:
    job_id = inserted(jm, cancels_itself_then_raises)

    outcome = executor(jm).run(cancels_itself_then_raises, job_id)

    assert outcome.status == "cancelled"
    done = jm.get(job_id)
    assert done.status is JobStatus.CANCELLED and done.finished_at is not None
    assert done.attempt == 1  # no retry ran


def test_a_cancelled_job_whose_worker_is_lost_ends_cancelled(jm: JobManager) -> None:
    job_id = inserted(jm, probe_jobs.noop)
    with writing(jm.engine) as conn:  # a worker claims it, with a lease already run out
        claim = store.claim(job_id, lease_owner="gone", lease_s=-1.0, via="broker", now=time.time())
        assert conn.execute(*claim).first() is not None
    assert jm.cancel(job_id).status is JobStatus.STARTED  # asked to stop, still running
    reaper = Reaper(jm.settings, jm.engine, jm.publisher)

    counts = reaper.tick()

    assert counts["lease_expired"] == 1
    assert jm.get(job_id).status is JobStatus.CANCELLED
    reaper.close()


def test_a_waiting_job_left_with_a_cancel_by_an_older_version_ends_cancelled(
    jm: JobManager,
) -> None:
    job_id = inserted(jm, probe_jobs.noop)
    with writing(jm.engine) as conn:  # what fail() used to leave: RETRYING, flag set
        conn.execute(
            sa.update(store.jobs)
            .where(store.jobs.c.id == job_id)
            .values(status="RETRYING", cancel_requested=True, next_attempt_at=time.time())
        )
    reaper = Reaper(jm.settings, jm.engine, jm.publisher)

    reaper.finish_old_cancels()

    assert jm.get(job_id).status is JobStatus.CANCELLED
    reaper.close()
