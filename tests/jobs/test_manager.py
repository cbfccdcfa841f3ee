from __future__ import annotations

import pytest

from tasklab.errors import JobDeclarationError, JobError, JobNotFound, JobStateError, JobTimeout
from tasklab.jobs import JobManager, JobStatus, job
from tasklab.lab import probe_jobs
from tests.jobs.conftest import effect_counts


def test_a_submitted_job_is_durable_before_submit_returns(manager: JobManager) -> None:
    submitted = manager.submit(probe_jobs.noop, queue="low", priority=7, owner="user:1")
    stored = manager.get(submitted.id)
    assert stored.status is JobStatus.QUEUED
    assert (stored.queue, stored.priority, stored.owner, stored.via) == ("low", 7, "user:1",
                                                                        "broker")
    assert stored.message_id


def test_the_same_owner_and_idempotency_key_return_the_same_job(manager: JobManager) -> None:
    a = manager.submit(probe_jobs.noop, idempotency_key="k1", owner="u1")
    b = manager.submit(probe_jobs.noop, idempotency_key="k1", owner="u1")
    c = manager.submit(probe_jobs.noop, idempotency_key="k1", owner="u2")
    assert a.id == b.id != c.id
    assert manager.list(owner="u1")[1] == 1


def test_jobs_run_on_a_real_worker_and_record_their_result(manager, job_settings,
                                                           worker_factory) -> None:
    worker_factory(job_settings).start()
    jobs = [manager.submit(probe_jobs.effect) for _ in range(20)]
    done = [manager.wait(j.id, timeout_s=60) for j in jobs]
    assert {j.status for j in done} == {JobStatus.SUCCEEDED}
    assert all(j.result == {"attempt": 1} and j.finished_at for j in done)
    assert effect_counts(manager) == {j.id: 1 for j in jobs}


def test_a_failing_job_retries_with_backoff_then_is_dead_and_can_be_retried(
    manager, job_settings, worker_factory
) -> None:
    worker_factory(job_settings).start()
    failing = manager.submit(probe_jobs.fail, "boom")
    dead = manager.wait(failing.id, timeout_s=30)
    assert dead.status is JobStatus.DEAD and dead.attempt == 2
    assert "RuntimeError: boom" in (dead.error or "") and "Traceback" in (dead.traceback or "")
    assert manager.list(status="dead")[1] == 1
    again = manager.retry(failing.id)
    assert again.status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.RETRYING)
    assert manager.wait(failing.id, timeout_s=30).attempt == 4


def test_a_job_that_fails_once_then_succeeds_writes_its_effect_once(
    manager, job_settings, worker_factory
) -> None:
    worker_factory(job_settings).start()
    j = manager.submit(probe_jobs.effect, fail_first=1)
    done = manager.wait(j.id, timeout_s=30)
    assert done.status is JobStatus.SUCCEEDED and done.attempt == 2
    assert effect_counts(manager) == {j.id: 1}


def test_a_queued_job_is_cancelled_and_its_message_skipped(manager, job_settings,
                                                          worker_factory) -> None:
    j = manager.submit(probe_jobs.effect)
    assert manager.cancel(j.id).status is JobStatus.CANCELLED
    worker_factory(job_settings).start()
    marker = manager.submit(probe_jobs.effect)
    manager.wait(marker.id, timeout_s=30)
    assert manager.get(j.id).status is JobStatus.CANCELLED
    assert j.id not in effect_counts(manager)
    with pytest.raises(JobStateError):
        manager.cancel(j.id)


def test_a_running_job_stops_at_its_next_progress_when_cancelled(
    manager, job_settings, worker_factory
) -> None:
    worker_factory(job_settings).start()
    j = manager.submit(probe_jobs.sleep, 20.0, steps=200)
    _wait_for(manager, j.id, JobStatus.STARTED)
    manager.cancel(j.id)
    done = manager.wait(j.id, timeout_s=15)
    assert done.status is JobStatus.CANCELLED
    assert (done.progress_current or 0) < 200


def test_progress_is_recorded_while_the_job_runs(manager, job_settings, worker_factory) -> None:
    worker_factory(job_settings).start()
    j = manager.submit(probe_jobs.sleep, 1.5, steps=3)
    done = manager.wait(j.id, timeout_s=30)
    assert (done.progress_current, done.progress_total) == (3, 3)


def test_wait_raises_when_time_runs_out(manager: JobManager) -> None:
    j = manager.submit(probe_jobs.noop)
    with pytest.raises(JobTimeout):
        manager.wait(j.id, timeout_s=0.05)


def test_bad_submissions_are_rejected_with_typed_errors(manager: JobManager) -> None:
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


async def test_the_async_api_submits_reads_and_lists(manager: JobManager) -> None:
    j = await manager.asubmit(probe_jobs.noop, owner="a", idempotency_key="x")
    again = await manager.asubmit(probe_jobs.noop, owner="a", idempotency_key="x")
    assert again.id == j.id
    assert (await manager.aget(j.id)).status is JobStatus.QUEUED
    items, total = await manager.alist(owner="a")
    assert total == 1 and items[0].id == j.id
    await manager.aclose()


def _wait_for(manager: JobManager, job_id: str, status: JobStatus, timeout_s: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while manager.get(job_id).status is not status:
        assert time.monotonic() < deadline, f"job never reached {status}"
        time.sleep(0.02)
