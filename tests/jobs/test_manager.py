from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tasklab.errors import JobDeclarationError, JobError, JobNotFound, JobStateError, JobTimeout
from tasklab.jobs import JobManager, JobStatus, job
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.jobs.conftest import effect_counts

SUBMIT_THEN_DIE = """
import os, signal, sys
from tasklab.jobs import JobManager
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
jm = JobManager(Settings.model_validate_json(sys.argv[1]))
job = jm.submit(probe_jobs.effect, priority=7, owner="user:1")
os.write(1, job.id.encode())
os.kill(os.getpid(), signal.SIGKILL)  # right after submit() returned: no flush, no atexit
"""


def test_a_submitted_job_is_durable_before_submit_returns(live_settings: Settings) -> None:
    """A process SIGKILLed right after submit() returned leaves the job in SQL as submitted,
    and it runs once (published by the relay if it got there, else by the reaper)."""
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT_THEN_DIE, live_settings.model_dump_json()],
        capture_output=True,
        text=True,
        env={**os.environ, "TASKLAB_IMPORTS": "[]"},
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    job_id = done.stdout.strip()
    assert len(job_id) == 32, done.stdout
    manager = JobManager(live_settings)
    try:
        stored = manager.get(job_id)
        assert (stored.task, stored.queue, stored.priority, stored.owner) == (
            probe_jobs.effect.name,
            "default",
            7,
            "user:1",
        )
        ran = manager.wait(job_id, timeout_s=30)
        assert ran.status is JobStatus.SUCCEEDED and ran.attempt == 1
        assert effect_counts(manager)[job_id] == 1
    finally:
        manager.close()


def test_submit_returns_before_the_relay_publishes_and_flush_waits_for_it(
    live: JobManager,
) -> None:
    submitted = live.submit(probe_jobs.noop, queue="low", priority=7, owner="user:1")
    assert submitted.status is JobStatus.PENDING  # no message carries it yet
    assert live.flush(timeout_s=10)
    stored = live.get(submitted.id)
    assert stored.status is JobStatus.QUEUED  # the relay recorded what it published
    assert stored.via == "broker" and stored.publish_count == 1
    assert stored.message_id


def test_the_same_owner_and_idempotency_key_return_the_same_job(live: JobManager) -> None:
    owner = uuid.uuid4().hex
    a = live.submit(probe_jobs.noop, queue="low", idempotency_key="k1", owner=owner)
    b = live.submit(probe_jobs.noop, queue="low", idempotency_key="k1", owner=owner)
    c = live.submit(probe_jobs.noop, queue="low", idempotency_key="k1", owner=owner + "x")
    assert a.id == b.id != c.id
    assert live.list(owner=owner)[1] == 1


def test_jobs_run_on_a_real_worker_and_record_their_result(live: JobManager) -> None:
    manager = live
    jobs = [manager.submit(probe_jobs.effect) for _ in range(20)]
    done = [manager.wait(j.id, timeout_s=60) for j in jobs]
    assert {j.status for j in done} == {JobStatus.SUCCEEDED}
    assert all(j.result and j.result["attempt"] == 1 and j.finished_at for j in done)
    # where each ran: a worker's pool process, as its lease owner names it
    assert all(str((j.result or {})["ran_on"]).rsplit(":", 1)[-1].isdigit() for j in done)
    counts = effect_counts(manager)
    assert [counts.get(j.id) for j in jobs] == [1] * 20


def test_a_failing_job_retries_with_backoff_then_is_dead_and_can_be_retried(
    live: JobManager,
) -> None:
    manager = live
    failing = manager.submit(probe_jobs.fail, "boom")
    dead = manager.wait(failing.id, timeout_s=30)
    assert dead.status is JobStatus.DEAD and dead.attempt == 2
    assert "RuntimeError: boom" in (dead.error or "") and "Traceback" in (dead.traceback or "")
    assert failing.id in {j.id for j in manager.list(status="dead", page_size=100)[0]}
    again = manager.retry(failing.id)
    assert again.status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.RETRYING)
    assert manager.wait(failing.id, timeout_s=30).attempt == 4


def test_a_job_that_fails_once_then_succeeds_writes_its_effect_once(live: JobManager) -> None:
    j = live.submit(probe_jobs.effect, fail_first=1)
    done = live.wait(j.id, timeout_s=30)
    assert done.status is JobStatus.SUCCEEDED and done.attempt == 2
    assert effect_counts(live)[j.id] == 1


def test_a_queued_job_is_cancelled_and_its_message_skipped(
    manager, job_settings, worker_factory
) -> None:
    j = manager.submit(probe_jobs.effect)
    assert manager.cancel(j.id).status is JobStatus.CANCELLED
    worker_factory(job_settings, concurrency=1).start()
    marker = manager.submit(probe_jobs.effect)
    manager.wait(marker.id, timeout_s=30)
    assert manager.get(j.id).status is JobStatus.CANCELLED
    assert j.id not in effect_counts(manager)
    with pytest.raises(JobStateError):
        manager.cancel(j.id)


def test_a_running_job_stops_at_its_next_progress_when_cancelled(live: JobManager) -> None:
    manager = live
    j = manager.submit(probe_jobs.sleep, 20.0, steps=200)
    _wait_for(manager, j.id, JobStatus.STARTED)
    manager.cancel(j.id)
    done = manager.wait(j.id, timeout_s=15)
    assert done.status is JobStatus.CANCELLED
    assert (done.progress_current or 0) < 200


def test_progress_is_recorded_while_the_job_runs(live: JobManager) -> None:
    j = live.submit(probe_jobs.sleep, 1.2, steps=3)
    done = live.wait(j.id, timeout_s=30)
    assert (done.progress_current, done.progress_total) == (3, 3)


def test_wait_raises_when_time_runs_out(live: JobManager) -> None:
    j = live.submit(probe_jobs.noop, queue="low")
    with pytest.raises(JobTimeout):
        live.wait(j.id, timeout_s=0.05)


def test_bad_submissions_are_rejected_with_typed_errors(live: JobManager) -> None:
    manager = live
    with pytest.raises(JobError, match="priority"):
        manager.submit(probe_jobs.noop, priority=10)
    with pytest.raises(JobError, match="no job task named"):
        manager.submit("no.such.task")
    with pytest.raises(JobNotFound):
        manager.get("0" * 32)
    with pytest.raises(JobError, match="page_size"):
        manager.list(page_size=10_000)


def test_unknown_options_are_rejected_when_the_job_is_declared() -> None:
    with pytest.raises(JobDeclarationError, match="retries"):
        job(retries=3)(lambda: None)
    with pytest.raises(JobDeclarationError, match="priority"):
        job(priority=11)(lambda: None)


async def test_the_async_api_submits_reads_and_lists(live: JobManager) -> None:
    owner = uuid.uuid4().hex
    j = await live.asubmit(probe_jobs.noop, queue="low", owner=owner, idempotency_key="x")
    again = await live.asubmit(probe_jobs.noop, queue="low", owner=owner, idempotency_key="x")
    assert again.id == j.id
    assert (await live.aget(j.id)).status is JobStatus.QUEUED
    items, total = await live.alist(owner=owner)
    assert total == 1 and items[0].id == j.id
    done = await live.asubmit(probe_jobs.noop)
    assert (await live.await_job(done.id, timeout_s=30)).status is JobStatus.SUCCEEDED
    await live.aclose()


def _wait_for(manager: JobManager, job_id: str, status: JobStatus, timeout_s: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while manager.get(job_id).status is not status:
        assert time.monotonic() < deadline, f"job never reached {status}"
        time.sleep(0.02)


def test_a_prepared_job_commits_with_the_callers_transaction(live: JobManager) -> None:
    rolled_back = live.prepare(probe_jobs.effect)
    with live.engine.connect() as conn, conn.begin() as tx:
        conn.execute(*rolled_back.insert)
        tx.rollback()
    with pytest.raises(JobNotFound):
        live.get(rolled_back.id)
    committed = live.prepare(probe_jobs.effect)
    with live.engine.begin() as conn:
        conn.execute(*committed.insert)
    live.dispatch(committed)
    assert live.wait(committed.id, timeout_s=30).status is JobStatus.SUCCEEDED
    assert effect_counts(live)[committed.id] == 1


def test_a_forked_child_gets_connections_and_a_local_executor_of_its_own(
    job_settings,
) -> None:
    import os

    jm = JobManager(job_settings)
    jm.counts()  # the parent holds a pooled connection now
    parent_local, parent_pool = id(jm.local), id(jm.engine.pool)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's atexit
        ok = id(jm.local) != parent_local and jm.engine.pool.checkedin() == 0
        ok = ok and jm.counts() == {}  # and it can use the database
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert id(jm.local) == parent_local and id(jm.engine.pool) == parent_pool
    assert jm.counts() == {}  # the parent's connection still works
    jm.close()


def test_jobs_published_by_the_relay_are_counted_once_each_by_task_queue_and_via(
    live: JobManager,
) -> None:
    from prometheus_client import REGISTRY

    labels = {"task": probe_jobs.noop.name, "queue": "low", "via": "broker"}

    def counted() -> float:
        return REGISTRY.get_sample_value("tasklab_jobs_submitted_total", labels) or 0.0

    before = counted()
    for _ in range(7):
        live.submit(probe_jobs.noop, queue="low")
    assert live.flush(timeout_s=10)
    assert counted() == before + 7
