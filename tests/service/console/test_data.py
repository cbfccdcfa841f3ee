"""The console's figures from the job records, on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest

from tasklab.database import make_engine
from tasklab.migrations import migrate
from tasklab.service.console import data
from tasklab.settings import Settings
from tests.service.conftest import make_settings
from tests.service.console.conftest import insert_jobs


@pytest.fixture
def console_database(database_url: str | None) -> str | None:
    return database_url


def test_throughput_and_queue_wait_are_counted_per_minute_over_the_last_hour(
    console_settings: Settings,
) -> None:
    now = time.time()
    insert_jobs(
        console_settings,
        [
            {"finished_at": now - 5, "queued_at": now - 20, "started_at": now - 19},  # waited 1 s
            {"finished_at": now - 6, "queued_at": now - 20, "started_at": now - 17},  # 3 s
            {"finished_at": now - 7, "queued_at": now - 20, "started_at": now - 11},  # 9 s
            {"finished_at": now - 125, "queued_at": now - 200, "started_at": now - 196},  # 4 s
            {"status": "DEAD", "finished_at": now - 130},
            {"finished_at": now - 4000},  # over an hour ago: in neither
        ],
    )
    engine = make_engine(console_settings)
    try:
        with engine.connect() as conn:
            series = data.throughput_per_minute(conn, now=now)
            waits = data.queue_wait_per_minute(conn, now=now)
            last_minute = data.finished_last_minute(conn, now=now)
    finally:
        engine.dispose()
    succeeded = dict(series["SUCCEEDED"])
    assert len(succeeded) == 60 and succeeded[0.0] == 3 and succeeded[-2.0] == 1
    assert sum(succeeded.values()) == 4 and dict(series["DEAD"])[-2.0] == 1
    assert dict(waits["p50"]) == {-2.0: 4.0, 0.0: 3.0}
    assert dict(waits["p95"])[0.0] == 9.0
    assert last_minute == {"default": {"SUCCEEDED": 3}}


@pytest.mark.parametrize(
    "where",
    [
        data.JobFilter(),
        data.JobFilter(status="DEAD"),
        data.JobFilter(status="QUEUED"),
        data.JobFilter(status="SUCCEEDED"),
        data.JobFilter(task="tasklab.probe_job.noop"),
        data.JobFilter(owner="user:7"),
        data.JobFilter(queue="low", since=1.0),
    ],
    ids=["all", "dead", "queued", "succeeded", "task", "owner", "queue-and-time"],
)
def test_a_jobs_page_reads_an_index_in_key_order_without_sorting_the_table(
    tmp_path: object, redis_url: str, where: data.JobFilter
) -> None:

    settings = make_settings(tmp_path, redis_url)  # type: ignore[arg-type]
    migrate(settings)
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            stmt = data.job_page_statement(where, after=data.Cursor(2e9, "f" * 32), limit=50)
            compiled = stmt.compile(conn, compile_kwargs={"literal_binds": True})
            plan = " ".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
    finally:
        engine.dispose()
    # Rows come in created_at order from the index; only rows tied on created_at may be put
    # in id order after it ("RIGHT PART"), never the whole match sorted.
    assert "USING INDEX" in plan and "TEMP B-TREE FOR ORDER BY" not in plan, plan


def test_running_jobs_are_listed_from_their_own_index_not_by_walking_every_job(
    tmp_path: object, redis_url: str
) -> None:
    """The few STARTED jobs are read from their partial index and sorted; walking the
    (created_at, id) index for them would read every job older than the page."""
    settings = make_settings(tmp_path, redis_url)  # type: ignore[arg-type]
    migrate(settings)
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            where = data.JobFilter(status="STARTED")
            stmt = data.job_page_statement(where, after=data.Cursor(2e9, "f" * 32), limit=50)
            compiled = stmt.compile(conn, compile_kwargs={"literal_binds": True})
            plan = " ".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
    finally:
        engine.dispose()
    assert "USING INDEX ix_tasklab_jobs_running_lease" in plan, plan


def test_dead_letter_queries_read_the_index_of_dead_jobs_only(
    tmp_path: object, redis_url: str
) -> None:
    """The dead letters' partial index (migration 0007) serves both queries: a submit, a
    claim or a finish of a job that does not die never touches it."""
    settings = make_settings(tmp_path, redis_url)  # type: ignore[arg-type]
    migrate(settings)
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            indexes = {
                name: sql
                for name, sql in conn.exec_driver_sql(
                    "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'tasklab_jobs'"
                    " AND type = 'index' AND sql IS NOT NULL"
                )
            }
            assert "WHERE status = 'DEAD'" in indexes["ix_tasklab_jobs_dead_task_error"]
            assert not any("error_key" in sql and "WHERE" not in sql for sql in indexes.values())
            groups = data.dead_groups(conn)  # runs: the literal status is valid SQL
            assert groups == []
            for stmt in (
                data.dead_groups_statement(limit=100),
                data.dead_ids_statement(task="t", error="e", limit=5, newest_first=True),
            ):
                compiled = stmt.compile(conn, compile_kwargs={"literal_binds": True})
                plan = " ".join(
                    r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
                )
                assert "ix_tasklab_jobs_dead_task_error" in plan, plan
    finally:
        engine.dispose()
