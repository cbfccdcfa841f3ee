"""HotWrites: the job layer's SQLite writes on the DBAPI connection behave as through SQLAlchemy."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from tasklab.jobs import JobManager, JobStatus, store
from tasklab.jobs.sqlite_writes import KEPT_PER_ENGINE, HotWrites
from tasklab.lab import probe_jobs
from tasklab.migrations import migrate
from tasklab.observe.sql import QUERY_STATS
from tasklab.settings import Settings


@pytest.fixture
def jm(tmp_path: Path) -> Iterator[JobManager]:
    settings = Settings(home_dir=tmp_path / ".tasklab")  # SQLite, the default
    migrate(settings)
    manager = JobManager(settings, local_fallback=False)
    yield manager
    manager.close()


def _claim(job_id: str) -> store.Prepared:
    return store.claim(job_id, lease_owner="w", lease_s=30, via="broker", now=time.time())


def test_insert_claim_and_complete_round_trip_their_values(jm: JobManager) -> None:
    writes = HotWrites(jm.engine)
    job = jm.prepare(probe_jobs.noop, 1.5, queue="low")
    assert writes.run(job.insert) == [1]

    (rows,) = writes.run(_claim(job.id))
    assert isinstance(rows, list) and len(rows) == 1
    assert rows[0]["args"] == [1.5] and rows[0]["kwargs"] == {}  # JSON decoded
    assert (rows[0]["queue"], rows[0]["attempt"]) == ("low", 1)
    assert writes.run(_claim(job.id)) == [[]]  # a second claim loses

    done = store.complete(job.id, 1, result={"ok": [1, 2]}, now=time.time())
    assert writes.run(done) == [1]
    stored = jm.get(job.id)
    assert stored.status is JobStatus.SUCCEEDED and stored.result == {"ok": [1, 2]}


def test_a_duplicate_insert_raises_sqlalchemys_integrity_error(jm: JobManager) -> None:
    """submit() relies on it to find the job a concurrent submit with the same key made."""
    writes = HotWrites(jm.engine)
    job = jm.prepare(probe_jobs.noop, owner="u", idempotency_key="k")
    writes.run(job.insert)
    with pytest.raises(IntegrityError):
        writes.run(jm.prepare(probe_jobs.noop, owner="u", idempotency_key="k").insert)


def test_statements_of_one_run_commit_together_or_not_at_all(jm: JobManager) -> None:
    writes = HotWrites(jm.engine)
    first, second = jm.prepare(probe_jobs.noop), jm.prepare(probe_jobs.noop)
    writes.run(first.insert)
    with pytest.raises(IntegrityError):  # the claim ran, then the insert failed: both undone
        writes.run(_claim(first.id), first.insert)
    assert jm.get(first.id).status is JobStatus.PENDING
    assert writes.run(second.insert, _claim(second.id))[0] == 1
    assert jm.get(second.id).status is JobStatus.STARTED


def test_its_statements_are_timed_like_any_other(jm: JobManager) -> None:
    before = QUERY_STATS.snapshot()["query_count"]
    HotWrites(jm.engine).run(jm.prepare(probe_jobs.noop).insert)
    assert QUERY_STATS.snapshot()["query_count"] == before + 1


def test_it_refuses_other_databases(postgres_url: str) -> None:
    from tasklab.database import make_engine

    engine = make_engine(Settings(database_url=postgres_url))
    with pytest.raises(ValueError, match="SQLite"):
        HotWrites(engine)
    engine.dispose()


def _insert(jm: JobManager, writes: HotWrites) -> str:
    job = jm.prepare(probe_jobs.noop, queue="low")
    writes.run(job.insert)
    return job.id


def test_a_thread_keeps_one_connection_and_only_the_first_few_threads_keep_one(
    jm: JobManager,
) -> None:
    writes = HotWrites(jm.engine)
    pool = writes.engine.pool
    before = pool.checkedout()
    for _ in range(5):
        _insert(jm, writes)
    assert pool.checkedout() == before + 1  # kept between writes, not one per write

    wrote, stop = threading.Barrier(9), threading.Event()

    def writer() -> None:
        _insert(jm, writes)
        wrote.wait(10)
        stop.wait(10)  # alive: a kept connection stays kept

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    wrote.wait(10)
    # this thread and three of the eight keep one; the other five returned theirs
    assert pool.checkedout() == before + KEPT_PER_ENGINE
    stop.set()
    for t in threads:
        t.join(10)
    # a thread that ends gives its connection back, and its slot to the next thread
    assert pool.checkedout() == before + 1
    assert writes._kept_count == 1
    assert jm.counts() == {"PENDING": 13}  # every insert landed


def test_a_forked_child_writes_on_its_own_connection_and_the_parent_still_can(
    jm: JobManager,
) -> None:
    writes = HotWrites(jm.engine)
    parent_job = _insert(jm, writes)  # the parent's thread keeps a connection
    pid = os.fork()
    if pid == 0:  # the child: SQLite handles must not cross a fork
        code = 1
        try:
            child_job = _insert(jm, writes)
            kept = writes._local.kept
            code = 0 if kept is not None and kept.pid == os.getpid() and child_job else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _insert(jm, writes)  # the parent's connection still works after the child is gone
    assert writes.run(_claim(parent_job))[0]
    assert jm.counts() == {"PENDING": 2, "STARTED": 1}  # the child's insert is there too
