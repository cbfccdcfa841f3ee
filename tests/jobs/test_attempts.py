"""A job's earlier attempts: each one that ended without success keeps where it ran, how it
ended and its error, beside the job's record (which holds the latest)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tasklab.embedded import EmbeddedRedis
from tasklab.jobs import JobManager, JobStatus
from tasklab.jobs.records import attempts
from tasklab.jobs.recovery import Reaper
from tasklab.settings import Settings
from tests.jobs.states import (
    executor,
    flaky,
    inserted,
    manager_for,
    reaper_for,
    running,
    settings_for,
)


@pytest.fixture
def settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    return settings_for(tmp_path, broker, database_url)


@pytest.fixture
def jm(settings: Settings) -> Iterator[JobManager]:
    yield from manager_for(settings)


@pytest.fixture
def reaper(settings: Settings, jm: JobManager) -> Iterator[Reaper]:
    yield from reaper_for(settings, jm)


def history(jm: JobManager, job_id: str) -> list[dict[str, Any]]:
    with jm.engine.connect() as conn:
        stmt = sa.select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.id)
        return [dict(r._mapping) for r in conn.execute(stmt)]


def test_each_failed_attempt_keeps_where_it_ran_and_its_error(jm: JobManager) -> None:
    job_id = inserted(jm, flaky)  # fails both of its attempts: boom 1, boom 2
    run = executor(jm)
    before = time.time()
    assert run.run(flaky, job_id).status == "retrying"
    assert run.run(flaky, job_id).status == "dead"

    rows = history(jm, job_id)
    assert [(r["attempt"], r["outcome"], r["ran_on"]) for r in rows] == [
        (1, "failed", "state-test"),
        (2, "failed", "state-test"),
    ]
    assert [r["error"] for r in rows] == ["RuntimeError: boom 1", "RuntimeError: boom 2"]
    assert all("Traceback" in r["traceback"] and "boom" in r["traceback"] for r in rows)
    assert all(before <= r["started_at"] <= r["ended_at"] for r in rows)
    assert jm.get(job_id).status is JobStatus.DEAD


def test_an_attempt_whose_worker_was_lost_is_kept_as_lost(jm: JobManager, reaper: Reaper) -> None:
    job_id = running(jm, flaky, lease_s=-1)
    assert reaper.tick()["lease_expired"] == 1
    [row] = history(jm, job_id)
    assert (row["attempt"], row["outcome"], row["ran_on"]) == (1, "lost", "gone")
    assert "lost" in row["error"]


def test_a_job_that_succeeds_at_once_has_no_earlier_attempts(jm: JobManager) -> None:
    from tasklab.lab import probe_jobs

    job_id = inserted(jm, probe_jobs.noop)
    assert executor(jm).run(probe_jobs.noop, job_id).status == "succeeded"
    assert history(jm, job_id) == []


def test_the_history_goes_with_its_job_when_finished_jobs_are_purged(
    jm: JobManager, reaper: Reaper
) -> None:
    job_id = inserted(jm, flaky)
    run = executor(jm)
    run.run(flaky, job_id)
    run.run(flaky, job_id)
    with jm.engine.begin() as conn:  # finished long ago
        conn.execute(sa.update(attempts).where(attempts.c.job_id == job_id).values(ended_at=1.0))
        conn.execute(
            sa.text("UPDATE tasklab_jobs SET finished_at = 1.0 WHERE id = :id"), {"id": job_id}
        )
    assert reaper.purge() == 1
    assert history(jm, job_id) == []
