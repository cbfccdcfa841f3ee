"""The job table's partial indexes by status (migration 0008) and the queries that read them:
counts per status, and the reaper's statements reading a range of one small index."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tasklab.database import make_engine
from tasklab.jobs import JobManager, reaper_sql
from tasklab.jobs.records import (
    CARRIED_SQL,
    ENDED_BADLY_SQL,
    RUNNING_SQL,
    WAITING_SQL,
    JobStatus,
)
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.jobs.states import inserted

STATUSES = {
    JobStatus.PENDING: 3,
    JobStatus.QUEUED: 2,
    JobStatus.RETRYING: 1,
    JobStatus.STARTED: 2,
    JobStatus.SUCCEEDED: 4,
    JobStatus.DEAD: 1,
    JobStatus.CANCELLED: 2,
}


@pytest.fixture
def jm(job_settings: Settings) -> Iterator[JobManager]:
    manager = JobManager(job_settings, local_fallback=False)
    yield manager
    manager.close()


def test_counts_per_status_add_up_every_job_and_leave_out_statuses_no_job_has(
    jm: JobManager,
) -> None:
    """SUCCEEDED has no index of its own: its count is every job less the others."""
    assert jm.counts() == {}
    for status, n in STATUSES.items():
        for _ in range(n):
            inserted(jm, probe_jobs.noop, status=status.value)
    assert jm.counts() == {status.value: n for status, n in STATUSES.items()}
    with jm.engine.begin() as conn:  # no job succeeded: no SUCCEEDED entry, not a zero
        conn.execute(sa.text("DELETE FROM tasklab_jobs WHERE status = 'SUCCEEDED'"))
    counts = jm.counts()
    assert JobStatus.SUCCEEDED.value not in counts and sum(counts.values()) == 11


def _sqlite_indexes(settings: Settings) -> dict[str, str]:
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'tasklab_jobs'"
                " AND type = 'index' AND sql IS NOT NULL"
            )
            return {str(name): str(sql) for name, sql in rows}
    finally:
        engine.dispose()


def test_no_index_leads_with_status_for_every_row_and_each_partial_one_names_its_statuses(
    job_settings: Settings,
) -> None:
    """A status change touches only the partial indexes whose statuses it leaves or enters;
    the queries carry the same predicates, literally (records.*_SQL)."""
    if job_settings.database_url:
        pytest.skip("reads SQLite's schema")
    indexes = _sqlite_indexes(job_settings)
    for name, predicate in [
        ("ix_tasklab_jobs_waiting", WAITING_SQL),
        ("ix_tasklab_jobs_carried", CARRIED_SQL),
        ("ix_tasklab_jobs_running_lease", RUNNING_SQL),
        ("ix_tasklab_jobs_ended_badly", ENDED_BADLY_SQL),
    ]:
        assert indexes[name].endswith(f"WHERE {predicate}"), indexes[name]
    whole = [sql for sql in indexes.values() if "WHERE" not in sql]
    assert not [sql for sql in whole if "(status" in sql], whole


@pytest.mark.parametrize(
    "name, statement, index",
    [
        ("expired leases", reaper_sql.expired_leases(100), "ix_tasklab_jobs_running_lease"),
        (
            "never published",
            reaper_sql.stranded(pending_before=2e9, due_before=2e9, left_broker={}, limit=100),
            "ix_tasklab_jobs_waiting (status=? AND created_at<?)",
        ),
        (
            "message lost",
            reaper_sql.stranded(
                pending_before=2e9,
                due_before=2e9,
                left_broker={("default", 0): 2e9, ("low", 3): 1e9},
                limit=100,
            ),
            "ix_tasklab_jobs_carried (queued_at<?)",
        ),
    ],
)
def test_the_reapers_statements_read_a_range_of_a_partial_index(
    job_settings: Settings, name: str, statement: sa.Select[object], index: str
) -> None:
    """Every worker's reaper runs these each tick, whatever the backlog: each reads a range
    of a partial index, never every waiting job or the table."""
    if job_settings.database_url:
        pytest.skip("reads SQLite's plans (PostgreSQL's follow its statistics)")
    engine = make_engine(job_settings)
    try:
        with engine.connect() as conn:
            compiled = statement.compile(conn, compile_kwargs={"literal_binds": True})
            plan = " | ".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
    finally:
        engine.dispose()
    assert f"USING INDEX {index}" in plan, (name, plan)
    assert "SCAN tasklab_jobs" not in plan, (name, plan)


def test_a_job_taken_back_from_a_lost_worker_is_found_by_the_reaper_by_its_creation(
    jm: JobManager,
) -> None:
    """release_expired() makes a job PENDING again with the queued_at of its old message:
    the never-published branch finds it by created_at all the same."""
    job_id = inserted(jm, probe_jobs.noop, status="PENDING", queued_at=time.time() - 5)
    with jm.engine.connect() as conn:
        stmt = reaper_sql.stranded(
            pending_before=time.time() + 1, due_before=time.time(), left_broker={}, limit=10
        )
        assert [r.id for r in conn.execute(stmt)] == [job_id]
