"""Each transition of a job's record as the executor and cancel() write it: the status it ends
in and every field that moves with it (error, finished_at, the lease, the next attempt's time,
the give-up hook's rows, progress), and the store's statements behind listings, counts and
republishing. In-process executors on real SQL (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tasklab.database import writing
from tasklab.embedded import EmbeddedRedis
from tasklab.errors import JobError, JobStateError
from tasklab.jobs import JobContext, JobManager, JobStatus, job, reaper_sql, store
from tasklab.jobs.execution import Outcome, current_job
from tasklab.jobs.records import effects
from tasklab.lab import probe_jobs
from tasklab.observe import metrics
from tasklab.settings import Settings
from tests.jobs import states
from tests.jobs.conftest import effect_counts
from tests.jobs.states import (
    BACKOFF_S,
    executor,
    flaky,
    gives_up,
    inserted,
    next_attempt_at,
    running,
)


@pytest.fixture
def state_settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    return states.settings_for(tmp_path, broker, database_url)


@pytest.fixture
def jm(state_settings: Settings) -> Iterator[JobManager]:
    yield from states.manager_for(state_settings)


@job(name="tests.state.long_error", max_attempts=1)
def long_error() -> None:
    raise RuntimeError("x" * 20_000)


@job(name="tests.state.commits_then_raises", bind=True, max_attempts=3)
def commits_then_raises(ctx: JobContext) -> None:
    with ctx.transaction() as session:
        session.execute(effects.insert().values(job_id=ctx.id, attempt=ctx.attempt, created_at=1.0))
    raise RuntimeError("after the commit")


@job(name="tests.state.cancelled_while_running", bind=True, max_attempts=3)
def cancelled_while_running(ctx: JobContext) -> None:
    with writing(ctx.engine) as conn:  # someone cancels it (without terminate) meanwhile
        conn.execute(store.request_cancel_running(ctx.id, now=time.time(), terminate=False))
    ctx.progress(1, 2)  # raises JobCancelled
    raise AssertionError("progress() did not stop a cancelled job")


@job(name="tests.state.loses_its_claim", bind=True, max_attempts=3)
def loses_its_claim(ctx: JobContext) -> None:
    with writing(ctx.engine) as conn:  # a reaper took the job back meanwhile
        conn.execute(store.jobs.update().where(store.jobs.c.id == ctx.id).values(status="PENDING"))
    ctx.progress(1, 2)  # raises StaleAttempt
    raise AssertionError("progress() did not stop a stale attempt")


# --- the executor -----------------------------------------------------------------------------


def test_a_failed_attempt_with_attempts_left_waits_its_backoff_as_retrying(
    jm: JobManager,
) -> None:
    job_id = inserted(jm, flaky)
    rescheduled: list[tuple[Any, ...]] = []
    before = time.time()
    outcome = executor(jm, lambda *a: rescheduled.append(a)).run(flaky, job_id)
    after = time.time()

    assert outcome == Outcome("retrying", retry_in_s=BACKOFF_S)
    j = jm.get(job_id)
    assert (j.status, j.attempt, j.error) == (JobStatus.RETRYING, 1, "RuntimeError: boom 1")
    assert j.traceback and j.traceback.startswith("Traceback") and "boom 1" in j.traceback
    due_at = next_attempt_at(jm, job_id)
    assert due_at is not None and before + BACKOFF_S <= due_at <= after + BACKOFF_S
    assert j.queued_at is not None and before <= j.queued_at <= after  # the retry's message
    assert (j.finished_at, j.lease_owner, j.lease_expires_at) == (None, None, None)
    # the next attempt is published with the backoff as its countdown, at the job's priority
    assert rescheduled == [(flaky, job_id, "default", flaky.priority, BACKOFF_S)]


def test_the_last_failed_attempt_is_dead_and_is_not_rescheduled(jm: JobManager) -> None:
    job_id = inserted(jm, flaky)
    rescheduled: list[tuple[Any, ...]] = []
    run = executor(jm, lambda *a: rescheduled.append(a))
    assert run.run(flaky, job_id).status == "retrying"
    before = time.time()
    outcome = run.run(flaky, job_id)
    after = time.time()

    assert outcome == Outcome("dead")
    j = jm.get(job_id)
    assert (j.status, j.attempt, j.error) == (JobStatus.DEAD, 2, "RuntimeError: boom 2")
    assert j.finished_at is not None and before <= j.finished_at <= after
    assert (next_attempt_at(jm, job_id), j.lease_owner, j.lease_expires_at) == (None, None, None)
    assert len(rescheduled) == 1  # only after the first attempt


def test_a_long_error_keeps_its_start_and_a_long_traceback_its_end(jm: JobManager) -> None:
    job_id = inserted(jm, long_error)
    assert executor(jm).run(long_error, job_id) == Outcome("dead")
    j = jm.get(job_id)
    assert j.error == ("RuntimeError: " + "x" * 20_000)[: store.MAX_ERROR_CHARS]
    assert j.traceback is not None and len(j.traceback) == store.MAX_TRACEBACK_CHARS
    assert j.traceback.endswith("x" * 100 + "\n")  # the exception's line, the last one


def test_a_job_that_gives_up_runs_its_hook_in_the_same_transaction(jm: JobManager) -> None:
    job_id = inserted(jm, gives_up)
    assert executor(jm).run(gives_up, job_id) == Outcome("dead")
    assert jm.get(job_id).status is JobStatus.DEAD
    with jm.engine.connect() as conn:
        marks = conn.execute(sa.select(effects.c.attempt).where(effects.c.job_id == job_id))
        assert marks.scalars().all() == [-1]


def test_a_job_that_raises_after_its_transaction_committed_is_succeeded(
    jm: JobManager,
) -> None:
    job_id = inserted(jm, commits_then_raises)
    assert executor(jm).run(commits_then_raises, job_id) == Outcome("succeeded")
    j = jm.get(job_id)
    assert (j.status, j.attempt, j.result, j.error) == (JobStatus.SUCCEEDED, 1, None, None)
    assert j.finished_at is not None and j.lease_owner is None
    assert effect_counts(jm) == {job_id: 1}


def test_a_job_cancelled_while_it_runs_stops_at_its_progress_as_cancelled(
    jm: JobManager,
) -> None:
    job_id = inserted(jm, cancelled_while_running)
    before = time.time()
    assert executor(jm).run(cancelled_while_running, job_id) == Outcome("cancelled")
    j = jm.get(job_id)
    assert j.status is JobStatus.CANCELLED and j.cancel_requested
    assert j.finished_at is not None and before <= j.finished_at
    assert (j.lease_owner, j.lease_expires_at) == (None, None)


def test_an_attempt_that_lost_its_claim_ends_stale_and_writes_nothing(jm: JobManager) -> None:
    job_id = inserted(jm, loses_its_claim)
    assert executor(jm).run(loses_its_claim, job_id) == Outcome("stale")
    j = jm.get(job_id)
    assert (j.status, j.error, j.finished_at) == (JobStatus.PENDING, None, None)


def test_a_delivery_records_its_message_and_a_second_one_is_skipped(jm: JobManager) -> None:
    job_id = inserted(jm, probe_jobs.noop)
    run = executor(jm)
    assert run.run(probe_jobs.noop, job_id, message_id="m-1") == Outcome("succeeded")
    assert jm.get(job_id).message_id == "m-1"  # the message cancel(terminate) would revoke
    finished = jm.get(job_id)
    assert run.run(probe_jobs.noop, job_id, message_id="m-2") == Outcome("skipped")
    assert jm.get(job_id) == finished


@job(name="tests.state.sees_its_lease", bind=True, lease_s=12.0)
def sees_its_lease(ctx: JobContext) -> dict[str, list[float]]:
    return {job_id: list(held) for job_id, held in ctx.leases.held().items()}


def test_a_running_job_s_lease_is_held_for_its_attempt_and_released_when_it_ends(
    jm: JobManager,
) -> None:
    """The keeper renews what it holds: the job's own id, attempt and lease (the job's
    lease_s over the executor's default of 30 s); nothing once the attempt ended."""
    run = executor(jm)
    first = inserted(jm, sees_its_lease)
    again = inserted(jm, sees_its_lease, attempt=2)  # its next attempt is the 3rd

    assert run.run(sees_its_lease, first) == Outcome("succeeded")
    assert run.run(sees_its_lease, again) == Outcome("succeeded")
    assert jm.get(first).result == {first: [1, 12.0]}
    assert jm.get(again).result == {again: [3, 12.0]}
    assert run.leases.held() == {}


@job(name="tests.state.reads_its_row", bind=True, queue="low", priority=7, max_attempts=4)
def reads_its_row(ctx: JobContext) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        row = conn.execute(*store.select_job(ctx.id)).one()
    return {
        "row": [row.status, row.lease_owner, row.via],
        "ctx": [ctx.id, ctx.task, ctx.queue, ctx.priority, ctx.attempt, ctx.max_attempts],
        "started_at": ctx.started_at == row.started_at is not None,
    }


def test_a_running_job_s_row_names_the_executor_that_claimed_it(jm: JobManager) -> None:
    """The lease owner is who the reaper and the attempt history name; the job's row loses
    it when the attempt ends. The job sees itself as its row was claimed."""
    job_id = inserted(jm, reads_its_row, attempt=1)
    assert executor(jm).run(reads_its_row, job_id) == Outcome("succeeded")
    j = jm.get(job_id)
    assert j.result == {
        "row": [JobStatus.STARTED.value, "state-test", "broker"],
        "ctx": [job_id, reads_its_row.name, "low", 7, 2, 4],
        "started_at": True,
    }
    assert j.lease_owner is None


@job(name="tests.state.waits_in_queue")
def waits_in_queue() -> None:
    pass


def queue_wait_s() -> float:
    """The summed queue wait of waits_in_queue's attempts, as the executor observed it."""
    return sum(
        sample.value
        for family in metrics.JOB_QUEUE_WAIT.collect()
        for sample in family.samples
        if sample.name.endswith("_sum") and sample.labels["task"] == waits_in_queue.name
    )


@pytest.mark.parametrize(
    ("waited_from", "values"),
    [
        ("queued", {"created_at": -1000.0, "queued_at": -100.0}),
        ("retry due", {"created_at": -1000.0, "queued_at": -500.0, "next_attempt_at": -100.0}),
        ("created", {"created_at": -100.0, "queued_at": None}),
    ],
)
def test_an_attempt_s_queue_wait_runs_from_its_retry_or_else_its_queueing_or_creation(
    jm: JobManager, waited_from: str, values: dict[str, float | None]
) -> None:
    now = time.time()
    job_id = inserted(
        jm, waits_in_queue, **{k: None if v is None else now + v for k, v in values.items()}
    )
    before = queue_wait_s()
    assert executor(jm).run(waits_in_queue, job_id) == Outcome("succeeded")
    assert 100 <= queue_wait_s() - before < 150, waited_from


def test_a_committed_job_not_yet_published_waits_unstarted_on_the_broker_path(
    jm: JobManager,
) -> None:
    """It names the message its relay will publish it in (the publisher sends that id)."""
    prepared = jm.prepare(probe_jobs.noop, countdown_s=60)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
    j = jm.get(prepared.id)
    assert (j.status, j.attempt, j.via, j.cancel_requested) == (
        JobStatus.PENDING,
        0,
        "broker",
        False,
    )
    assert (j.queued_at, j.started_at, j.lease_owner) == (None, None, None)
    assert j.message_id == prepared.values["message_id"] is not None
    due = next_attempt_at(jm, prepared.id)
    assert due is not None and 55 < due - j.created_at <= 60


# --- store statements ---------------------------------------------------------------------------


def test_a_reaper_takes_only_jobs_still_waiting_or_carried_by_an_old_message(
    jm: JobManager,
) -> None:
    pending = inserted(jm, probe_jobs.noop, via="local")
    old_message = inserted(jm, probe_jobs.noop, status="QUEUED", queued_at=10.0)
    new_message = inserted(jm, probe_jobs.noop, status="QUEUED", queued_at=30.0)
    started = inserted(jm, probe_jobs.noop, status="STARTED", queued_at=10.0)
    ids = [pending, old_message, new_message, started]
    with writing(jm.engine) as conn:
        taken = conn.execute(reaper_sql.take_for_republish(ids, before=20.0, now=40.0)).scalars()
        assert set(taken) == {pending, old_message}
    for i in (pending, old_message):
        j = jm.get(i)
        assert (j.status, j.queued_at, j.via, j.publish_count) == (
            JobStatus.QUEUED,
            40.0,
            "broker",
            1,
        )
    assert jm.get(new_message).queued_at == 30.0
    assert jm.get(started).status is JobStatus.STARTED


def test_a_job_was_handed_to_the_broker_when_queued_or_else_when_created(
    jm: JobManager,
) -> None:
    queued = inserted(jm, probe_jobs.noop, queued_at=50.0, created_at=5.0)
    never = inserted(jm, probe_jobs.noop, created_at=6.0)
    with jm.engine.connect() as conn:
        rows = dict(conn.execute(reaper_sql.queued_at_of([queued, never])).all())
    assert rows == {queued: 50.0, never: 6.0}


def test_counts_are_per_status(jm: JobManager) -> None:
    for status in ("PENDING", "PENDING", "DEAD"):
        inserted(jm, probe_jobs.noop, status=status)
    assert jm.counts() == {"PENDING": 2, "DEAD": 1}


def test_a_listing_filters_by_owner_status_and_task_newest_first_by_pages(
    jm: JobManager,
) -> None:
    a1 = inserted(jm, probe_jobs.noop, owner="a", created_at=1.0)
    a2 = inserted(jm, probe_jobs.effect, owner="a", created_at=2.0, status="DEAD")
    a3 = inserted(jm, probe_jobs.noop, owner="a", created_at=3.0)
    b1 = inserted(jm, probe_jobs.noop, owner="b", created_at=3.0)

    def ids(**filters: Any) -> list[str]:
        return [j.id for j in jm.list(page_size=100, **filters)[0]]

    assert ids(owner="a") == [a3, a2, a1]
    assert ids(status="dead") == [a2]
    assert ids(task=probe_jobs.noop.name, owner="a") == [a3, a1]
    assert ids() == [*sorted([a3, b1]), a2, a1]  # same time: by id
    page1, total = jm.list(owner="a", page=1, page_size=2)
    page2, _ = jm.list(owner="a", page=2, page_size=2)
    assert total == 3 and [j.id for j in page1] == [a3, a2] and [j.id for j in page2] == [a1]


# --- cancel and the broker refusing a submit ------------------------------------------------------


def test_a_cancel_ends_a_waiting_job_at_once_and_asks_a_running_one_to_stop(
    jm: JobManager,
) -> None:
    waiting, other_waiting = inserted(jm, probe_jobs.noop), inserted(jm, probe_jobs.noop)
    asked, other_running = (running(jm, probe_jobs.noop, lease_s=60) for _ in range(2))
    before = time.time()
    jm.cancel(waiting)
    jm.cancel(asked)

    w = jm.get(waiting)
    assert (w.status, w.cancel_requested) == (JobStatus.CANCELLED, True)
    assert w.finished_at is not None and before <= w.finished_at
    a = jm.get(asked)
    assert (a.status, a.cancel_requested, a.finished_at) == (JobStatus.STARTED, True, None)
    assert a.lease_owner == "gone"  # it stops at its next progress()
    assert jm.get(other_waiting).status is JobStatus.PENDING
    assert not jm.get(other_running).cancel_requested


def test_a_cancel_with_terminate_ends_a_running_job_unless_its_transaction_committed(
    jm: JobManager,
) -> None:
    doomed = running(jm, probe_jobs.noop, lease_s=60)
    committed = running(jm, probe_jobs.noop, lease_s=60, committed_at=2.0)
    before = time.time()
    jm.cancel(doomed, terminate=True)
    jm.cancel(committed, terminate=True)

    d = jm.get(doomed)
    assert (d.status, d.cancel_requested) == (JobStatus.CANCELLED, True)
    assert d.finished_at is not None and before <= d.finished_at
    assert (d.lease_owner, d.lease_expires_at) == (None, None)
    c = jm.get(committed)  # done, only not recorded yet: asked to stop at most
    assert (c.status, c.cancel_requested, c.lease_owner) == (JobStatus.STARTED, True, "gone")


def test_a_submit_the_broker_refuses_waits_in_sql_and_leaves_other_jobs_alone(
    jm: JobManager, broker: EmbeddedRedis
) -> None:
    published = jm.submit(probe_jobs.noop, queue="low")
    assert jm.flush(timeout_s=10)
    assert jm.get(published.id).status is JobStatus.QUEUED
    broker.stop()
    refused = jm.submit(probe_jobs.noop, queue="low")
    assert jm.flush(timeout_s=10)

    r = jm.get(refused.id)
    assert (r.status, r.via, r.publish_count) == (JobStatus.PENDING, "local", 0)
    p = jm.get(published.id)
    assert (p.status, p.via) == (JobStatus.QUEUED, "broker")


@job(name="tests.state.reports_progress", bind=True)
def reports_progress(ctx: JobContext, message: str) -> None:
    ctx.progress(1, 2, message)


def test_progress_records_its_message_cut_to_500_characters(jm: JobManager) -> None:
    short, long = inserted(jm, reports_progress), inserted(jm, reports_progress)
    with writing(jm.engine) as conn:
        for job_id, message in ((short, "halfway"), (long, "y" * 600)):
            conn.execute(
                store.jobs.update().where(store.jobs.c.id == job_id).values(args=[message])
            )
    run = executor(jm)
    assert run.run(reports_progress, short).status == "succeeded"
    assert run.run(reports_progress, long).status == "succeeded"
    assert jm.get(short).progress_message == "halfway"
    assert jm.get(long).progress_message == "y" * 500
    assert (jm.get(short).progress_current, jm.get(short).progress_total) == (2, 2)


@job(name="tests.state.steps", bind=True)
def steps(ctx: JobContext) -> list[Any]:
    """Three quick steps of progress and one without a total, reading the row after each."""
    seen: list[Any] = []
    for i, word in enumerate(("one", "two", "three"), start=1):
        ctx.progress(i, 3, word)
        with ctx.engine.connect() as conn:
            row = conn.execute(*store.select_job(ctx.id)).one()
        seen.append([row.progress_current, row.progress_message])
    return seen


def test_progress_is_written_at_most_every_half_second_but_always_at_the_end(
    jm: JobManager,
) -> None:
    job_id = inserted(jm, steps)
    assert executor(jm).run(steps, job_id) == Outcome("succeeded")
    # the second step came within PROGRESS_MIN_INTERVAL_S of the first: not written
    assert jm.get(job_id).result == [[1, "one"], [1, "one"], [3, "three"]]


@job(name="tests.state.counts_without_a_total", bind=True)
def counts_without_a_total(ctx: JobContext) -> int | None:
    ctx.progress(7)
    return ctx.attempt


def test_progress_without_a_total_is_recorded(jm: JobManager) -> None:
    job_id = inserted(jm, counts_without_a_total)
    assert executor(jm).run(counts_without_a_total, job_id) == Outcome("succeeded")
    j = jm.get(job_id)
    assert (j.progress_current, j.progress_total, j.result) == (7, None, 1)


@job(name="tests.state.outlives_its_lease", bind=True)
def outlives_its_lease(ctx: JobContext) -> str:
    with writing(ctx.engine) as conn:  # a reaper took the job back while it ran
        conn.execute(store.jobs.update().where(store.jobs.c.id == ctx.id).values(status="PENDING"))
    assert ctx.leases is not None and ctx.leases.renew_now() == 0  # the keeper notices
    return "a result nobody may record"


def test_an_attempt_whose_lease_was_lost_drops_its_result(jm: JobManager) -> None:
    job_id = inserted(jm, outlives_its_lease)
    assert executor(jm).run(outlives_its_lease, job_id) == Outcome("stale")
    j = jm.get(job_id)
    assert (j.status, j.result, j.finished_at) == (JobStatus.PENDING, None, None)


# --- retry, idempotency, current_job ---------------------------------------------------------


def test_a_dead_job_retried_gets_fresh_attempts_and_a_clean_record(jm: JobManager) -> None:
    job_id = inserted(jm, flaky)
    run = executor(jm)
    run.run(flaky, job_id), run.run(flaky, job_id)
    assert jm.get(job_id).status is JobStatus.DEAD
    again = jm.retry(job_id)
    assert again.status is JobStatus.QUEUED  # published at once
    assert (again.attempt, again.max_attempts) == (2, 2 + flaky.retry.max_attempts)
    assert (again.error, again.traceback, again.finished_at) == (None, None, None)
    assert run.run(flaky, job_id).status == "retrying"  # attempt 3 of 4 runs
    with pytest.raises(JobStateError, match="only DEAD or CANCELLED"):
        jm.retry(job_id)


def test_the_same_owner_and_key_submit_one_job(jm: JobManager) -> None:
    a = jm.submit(probe_jobs.noop, queue="low", idempotency_key="k", owner="u1")
    b = jm.submit(probe_jobs.noop, queue="low", idempotency_key="k", owner="u1")
    c = jm.submit(probe_jobs.noop, queue="low", idempotency_key="k", owner="u2")
    d = jm.submit(probe_jobs.noop, queue="low", idempotency_key="other", owner="u1")
    assert a.id == b.id and len({a.id, c.id, d.id}) == 3
    assert jm.list(owner="u1")[1] == 2


@job(name="tests.state.knows_itself", bind=True)
def knows_itself(ctx: JobContext) -> bool:
    return current_job() is ctx


def test_a_running_job_finds_itself_as_the_current_job(jm: JobManager) -> None:
    job_id = inserted(jm, knows_itself)
    assert executor(jm).run(knows_itself, job_id) == Outcome("succeeded")
    assert jm.get(job_id).result is True
    with pytest.raises(JobError, match="outside a running tasklab job"):
        current_job()
