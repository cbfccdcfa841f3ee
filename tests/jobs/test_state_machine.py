"""Each transition of a job's record, as the executor, the reaper and cancel() write it: the
status it ends in and every field that moves with it (error, finished_at, the lease, the
next attempt's time, the give-up hook's rows). In-process executors and reapers on real SQL
(SQLite and PostgreSQL) and a Redis broker of the test's own."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tasklab.database import writing
from tasklab.embedded import EmbeddedRedis
from tasklab.errors import JobError, JobStateError
from tasklab.jobs import JobContext, JobManager, JobStatus, job, store
from tasklab.jobs.carriers import redis_list
from tasklab.jobs.execution import Executor, Outcome, current_job
from tasklab.jobs.hooks import Ended
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.publisher import BUNDLE_TASK
from tasklab.jobs.records import effects
from tasklab.jobs.recovery import BATCH, Reaper, _epoch_start, start_reaper
from tasklab.jobs.worker_side import WorkerRuntime
from tasklab.lab import probe_jobs
from tasklab.migrations import migrate
from tasklab.settings import Settings
from tests.jobs.conftest import effect_counts, queued_messages
from tests.support.frozen import FrozenServer

BACKOFF_S = 5.0
RETENTION_DAYS = 30.0


@job(name="tests.state.flaky", max_attempts=2, backoff_s=BACKOFF_S, jitter=False, bind=True)
def flaky(ctx: JobContext) -> None:
    raise RuntimeError(f"boom {ctx.attempt}")


@job(name="tests.state.long_error", max_attempts=1)
def long_error() -> None:
    raise RuntimeError("x" * 20_000)


def _give_up(conn: sa.Connection, ended: Ended) -> None:
    """The application's row that moves with a job that gave up (attempt -1 marks it)."""
    conn.execute(effects.insert().values(job_id=ended.id, attempt=-1, created_at=0.0))


@job(name="tests.state.gives_up", max_attempts=1, on_give_up=_give_up)
def gives_up() -> None:
    raise RuntimeError("no")


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


@pytest.fixture
def state_settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=broker.url,
        database_url=database_url,
        local_workers=0,  # a job the broker refuses waits in SQL
        job_retention_days=RETENTION_DAYS,
        breaker_reset_s=60,
    )
    migrate(settings)
    return settings


@pytest.fixture
def jm(state_settings: Settings) -> Iterator[JobManager]:
    manager = JobManager(state_settings)
    yield manager
    manager.close()


@pytest.fixture
def reaper(state_settings: Settings, jm: JobManager) -> Iterator[Reaper]:
    r = Reaper(state_settings, jm.engine, jm.publisher)
    yield r
    r.close()


def inserted(jm: JobManager, spec: Any, *, countdown_s: float = 0, **values: Any) -> str:
    """A committed job no message carries (as if its relay had not published it yet), with
    ``values`` written over its row."""
    prepared = jm.prepare(spec, countdown_s=countdown_s)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
        if values:
            conn.execute(store.jobs.update().where(store.jobs.c.id == prepared.id).values(**values))
    return prepared.id


def running(jm: JobManager, spec: Any, *, lease_s: float, **values: Any) -> str:
    """A job claimed by a worker ("gone") with a lease of ``lease_s`` from now."""
    job_id = inserted(jm, spec)
    with writing(jm.engine) as conn:
        claim = store.claim(job_id, lease_owner="gone", lease_s=lease_s, via="broker", now=1.0)
        assert conn.execute(*claim).first() is not None
        if values:
            conn.execute(store.jobs.update().where(store.jobs.c.id == job_id).values(**values))
    return job_id


def next_attempt_at(jm: JobManager, job_id: str) -> float | None:
    """When a job's next attempt is due (a column the Job snapshot does not carry)."""
    with jm.engine.connect() as conn:
        return conn.execute(*store.select_job(job_id)).one().next_attempt_at


def carried(client: redis.Redis, queue: str) -> list[str]:
    """The job ids the messages waiting on ``queue`` carry (a bundle carries several)."""
    return [
        job_id
        for task, _, args in queued_messages(client, queue)
        for job_id in (args[1] if task == BUNDLE_TASK else args)
    ]


def executor(jm: JobManager, reschedule: Callable[..., None] = lambda *a: None) -> Executor:
    return Executor(
        jm.engine,
        lease_owner="state-test",
        via="broker",
        default_lease_s=30,
        leases=LeaseKeeper(jm.engine),
        reschedule=reschedule,
    )


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


# --- the reaper -------------------------------------------------------------------------------


def test_the_reaper_takes_back_each_expired_lease_by_how_it_must_end(
    jm: JobManager, reaper: Reaper
) -> None:
    retried = running(jm, flaky, lease_s=-1)  # attempt 1 of 2
    last = running(jm, flaky, lease_s=-1, max_attempts=1)
    cancelled = running(jm, flaky, lease_s=-1, cancel_requested=True)
    committed = running(jm, flaky, lease_s=-1, committed_at=2.0)
    alive = running(jm, flaky, lease_s=60)
    before = time.time()
    counts = reaper.tick()
    after = time.time()

    assert counts["lease_expired"] == 4
    ended = {i: jm.get(i) for i in (retried, last, cancelled, committed, alive)}
    assert {i: (j.status, j.error) for i, j in ended.items()} == {
        retried: (JobStatus.PENDING, "lease expired (worker lost); re-queued"),
        last: (JobStatus.DEAD, "lease expired on the last attempt (worker lost)"),
        cancelled: (JobStatus.CANCELLED, "cancelled; its worker was lost"),
        committed: (
            JobStatus.SUCCEEDED,
            "its worker was lost after its transaction committed; result not recorded",
        ),
        alive: (JobStatus.STARTED, None),
    }
    assert ended[retried].finished_at is None  # it runs again
    for i in (last, cancelled, committed):
        assert ended[i].finished_at is not None and before <= ended[i].finished_at <= after
    for i in (retried, last, cancelled, committed):
        assert (ended[i].lease_owner, ended[i].lease_expires_at) == (None, None)
    assert ended[alive].lease_owner == "gone" and ended[alive].lease_expires_at is not None


def test_a_job_that_gives_up_when_its_lease_runs_out_runs_its_hook(
    jm: JobManager, reaper: Reaper
) -> None:
    job_id = running(jm, gives_up, lease_s=-1)
    assert reaper.tick()["lease_expired"] == 1
    assert jm.get(job_id).status is JobStatus.DEAD
    with jm.engine.connect() as conn:
        marks = conn.execute(sa.select(effects.c.attempt).where(effects.c.job_id == job_id))
        assert marks.scalars().all() == [-1]


def test_jobs_the_broker_refuses_to_the_reaper_wait_in_sql_as_before(
    jm: JobManager, reaper: Reaper, broker: EmbeddedRedis
) -> None:
    old = time.time() - 60
    ids = [inserted(jm, probe_jobs.noop, created_at=old) for _ in range(3)]
    broker.stop()
    counts = reaper.tick()
    assert (counts["unpublished"], counts["lease_expired"]) == (0, 0)
    assert {(jm.get(i).status, jm.get(i).publish_count) for i in ids} == {(JobStatus.PENDING, 0)}


def test_a_job_whose_relay_died_is_published_with_what_is_left_of_its_countdown(
    jm: JobManager, reaper: Reaper, broker: EmbeddedRedis
) -> None:
    job_id = inserted(jm, probe_jobs.noop, countdown_s=120)
    with writing(jm.engine) as conn:  # committed a minute ago, never published
        conn.execute(
            store.jobs.update()
            .where(store.jobs.c.id == job_id)
            .values(created_at=store.jobs.c.created_at - 60)
        )
    due_at = next_attempt_at(jm, job_id)
    assert due_at is not None
    assert reaper.tick()["unpublished"] == 1
    j = jm.get(job_id)
    assert (j.status, j.via, j.publish_count) == (JobStatus.QUEUED, "broker", 1)
    assert j.queued_at is not None and abs(j.queued_at - time.time()) < 5  # published now
    client = redis.Redis.from_url(broker.url)
    try:
        [raw] = [m for k in client.keys("default*") for m in client.lrange(k, 0, -1)]
    finally:
        client.close()
    message = json.loads(raw)
    args = json.loads(base64.b64decode(message["body"]))[0]
    assert args == [job_id]
    eta = message["headers"]["eta"]
    assert eta is not None  # not run before it is due
    assert abs(datetime.fromisoformat(eta).timestamp() - due_at) < 2


def test_a_retry_whose_countdown_message_left_the_queue_is_published_again_once_due(
    jm: JobManager, state_settings: Settings
) -> None:
    """A retry's countdown message waits in a worker until it is due: the job counts as lost
    only once it is due since requeue_after_s without starting."""
    settings = state_settings.model_copy(update={"requeue_after_s": 1.0})
    reaper = Reaper(settings, jm.engine, jm.publisher)
    try:
        t0 = time.time()
        reaper.tick()  # the queue is empty now: every message published before left it
        lost = inserted(jm, probe_jobs.noop, status="RETRYING", queued_at=t0 - 60)
        with writing(jm.engine) as conn:  # due long ago; the other one is due in 1.5 s
            conn.execute(
                store.jobs.update().where(store.jobs.c.id == lost).values(next_attempt_at=t0 - 60)
            )
        held = inserted(jm, probe_jobs.noop, status="RETRYING", queued_at=t0 - 60)
        with writing(jm.engine) as conn:
            conn.execute(
                store.jobs.update().where(store.jobs.c.id == held).values(next_attempt_at=t0 + 1.5)
            )
        time.sleep(1.1)  # the empty queue's mark is requeue_after_s old
        assert reaper.tick()["message_lost"] == 1
        assert (jm.get(lost).publish_count, jm.get(held).publish_count) == (1, 0)
    finally:
        reaper.close()


def test_jobs_left_waiting_with_a_cancel_end_cancelled_with_their_hook(
    jm: JobManager, reaper: Reaper
) -> None:
    job_id = inserted(jm, gives_up, status="QUEUED", cancel_requested=True)
    other = inserted(jm, gives_up, status="QUEUED")
    before = time.time()
    reaper.finish_old_cancels()
    j = jm.get(job_id)
    assert j.status is JobStatus.CANCELLED
    assert j.finished_at is not None and before <= j.finished_at
    assert jm.get(other).status is JobStatus.QUEUED
    with jm.engine.connect() as conn:
        marked = conn.execute(sa.select(effects.c.job_id).where(effects.c.attempt == -1))
        assert marked.scalars().all() == [job_id]


def test_finished_jobs_are_purged_only_once_past_the_retention(
    jm: JobManager, reaper: Reaper
) -> None:
    retention_s = RETENTION_DAYS * 86400
    now = time.time()
    past = inserted(jm, probe_jobs.noop, status="DEAD", finished_at=now - retention_s - 10)
    within = inserted(jm, probe_jobs.noop, status="DEAD", finished_at=now - retention_s + 10)
    waiting = inserted(jm, probe_jobs.noop, finished_at=now - retention_s - 10)
    assert reaper.purge() == 1
    assert {j.id for j in jm.list(page_size=100)[0]} == {within, waiting}
    assert past not in {j.id for j in jm.list(page_size=100)[0]}


def test_one_tick_publishes_a_backlog_larger_than_a_batch(
    jm: JobManager, reaper: Reaper, broker: EmbeddedRedis
) -> None:
    n = 2 * BATCH + 37  # three batches, the last one short
    prepared = [jm.prepare(probe_jobs.noop, queue="low") for _ in range(n)]
    with writing(jm.engine) as conn:  # committed a minute ago, never published
        conn.execute(store.jobs.insert(), [{**p.insert[1], "created_at": 1.0} for p in prepared])
    assert reaper.tick()["unpublished"] == n
    assert jm.counts() == {"QUEUED": n}
    client = redis.Redis.from_url(broker.url)
    try:
        assert sorted(carried(client, "low")) == sorted(p.id for p in prepared)
    finally:
        client.close()


def test_after_a_flush_jobs_of_every_priority_are_published_again_once(
    jm: JobManager, state_settings: Settings, broker: EmbeddedRedis
) -> None:
    first, second = (Reaper(state_settings, jm.engine, jm.publisher) for _ in range(2))
    try:
        first.tick(), second.tick()  # both learn the broker's epoch
        lost = [jm.submit(probe_jobs.noop, queue="low", priority=p).id for p in (0, 5, 9)]
        assert jm.flush(timeout_s=10)
        client = redis.Redis.from_url(broker.url)
        client.flushall()
        assert first.tick()["message_lost"] == 3  # it sees the new epoch first
        after = jm.submit(probe_jobs.noop, queue="low", priority=9)
        assert jm.flush(timeout_s=10)
        # the second learns of the flush from the epoch's time: what was published since
        # (the first reaper's copies, the new job) still has its message
        assert second.tick()["message_lost"] == 0
        assert sorted(carried(client, "low")) == sorted([*lost, after.id])
        assert {jm.get(i).publish_count for i in lost} == {2}
        client.close()
    finally:
        first.close()
        second.close()


def test_the_epoch_marker_tells_when_the_broker_was_emptied() -> None:
    assert _epoch_start("0123456789abcdef:1700000000.25") == 1700000000.25
    before = time.time()
    assert before <= _epoch_start("no time in it") <= time.time()


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
        taken = conn.execute(store.take_for_republish(ids, before=20.0, now=40.0)).scalars()
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
        rows = dict(conn.execute(store.queued_at_of([queued, never])).all())
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


# --- what the reaper waits for, and where it looks ----------------------------------------------


@pytest.mark.parametrize(
    ("publish_timeout_s", "young_s", "old_s"),
    [(1.0, 1.5, 2.5), (2.0, 3.0, 4.5)],  # the grace: max(2 s, 2 x publish_timeout_s)
)
def test_a_pending_job_is_left_to_its_relay_for_a_grace_then_published(
    jm: JobManager, state_settings: Settings, publish_timeout_s: float, young_s: float, old_s: float
) -> None:
    settings = state_settings.model_copy(update={"publish_timeout_s": publish_timeout_s})
    reaper = Reaper(settings, jm.engine, jm.publisher)
    try:
        now = time.time()
        young = inserted(jm, probe_jobs.noop, created_at=now - young_s)
        old = inserted(jm, probe_jobs.noop, created_at=now - old_s)
        assert reaper.tick()["unpublished"] == 1
        assert (jm.get(young).status, jm.get(old).status) == (JobStatus.PENDING, JobStatus.QUEUED)
    finally:
        reaper.close()


def lose_the_message_of(client: redis.Redis, queue: str, priority: int) -> None:
    """A worker reserved the message, then died: it is gone from the queue."""
    assert client.rpop(redis_list(queue, priority)) is not None


def test_a_job_on_an_extra_queue_whose_message_vanished_is_published_again(
    jm: JobManager, state_settings: Settings, broker: EmbeddedRedis
) -> None:
    settings = state_settings.model_copy(
        update={"requeue_after_s": 1.0, "extra_queues": ["reports", "lab-*"]}
    )
    manager = JobManager(settings)
    reaper = Reaper(settings, manager.engine, manager.publisher)
    client = redis.Redis.from_url(broker.url)
    try:
        lost = manager.submit(probe_jobs.noop, queue="reports")
        assert manager.flush(timeout_s=10)
        lose_the_message_of(client, "reports", probe_jobs.noop.priority)
        reaper.tick()  # the queue's list is empty now
        time.sleep(1.1)
        assert reaper.tick()["message_lost"] == 1
        assert manager.get(lost.id).publish_count == 2 and carried(client, "reports") == [lost.id]
    finally:
        client.close()
        reaper.close()
        manager.close()


def test_a_lost_job_is_found_behind_any_number_of_finished_ones(
    jm: JobManager, state_settings: Settings, broker: EmbeddedRedis
) -> None:
    settings = state_settings.model_copy(update={"requeue_after_s": 1.0})
    reaper = Reaper(settings, jm.engine, jm.publisher)
    client = redis.Redis.from_url(broker.url)
    try:
        done = [jm.prepare(probe_jobs.noop, queue="low") for _ in range(BATCH + 10)]
        with writing(jm.engine) as conn:  # older than the lost job, their messages long gone
            conn.execute(
                store.jobs.insert(),
                [
                    {**p.insert[1], "created_at": 1.0, "queued_at": 1.0, "status": "SUCCEEDED"}
                    for p in done
                ],
            )
        lost = jm.submit(probe_jobs.noop, queue="low")
        assert jm.flush(timeout_s=10)
        lose_the_message_of(client, "low", probe_jobs.noop.priority)
        reaper.tick()
        time.sleep(1.1)
        assert reaper.tick()["message_lost"] == 1
        assert jm.get(lost.id).publish_count == 2
        assert jm.counts()["SUCCEEDED"] == BATCH + 10  # finished jobs are never published
    finally:
        client.close()
        reaper.close()


def test_a_reaper_tick_on_a_hung_broker_ends_within_its_timeouts(
    jm: JobManager, state_settings: Settings
) -> None:
    hung = FrozenServer()
    settings = state_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{hung.port}/0", "publish_timeout_s": 0.5}
    )
    manager = JobManager(settings)
    reaper = Reaper(settings, manager.engine, manager.publisher)
    inserted(manager, probe_jobs.noop, created_at=time.time() - 60)
    ticked: list[dict[str, int]] = []
    tick = threading.Thread(target=lambda: ticked.append(reaper.tick()), daemon=True)
    try:
        tick.start()
        tick.join(20)  # each broker call gives up after publish_timeout_s
        assert not tick.is_alive(), "the reaper's tick hangs with the broker"
        assert ticked[0]["unpublished"] == 0  # the job waits in SQL for the broker
    finally:
        hung.close()
        reaper.close()
        manager.close()


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


# --- retry, idempotency, hand-back, the reaper's thread, current_job ----------------------------


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


def test_handed_back_jobs_are_carried_by_their_new_bundle(
    jm: JobManager, state_settings: Settings, broker: EmbeddedRedis
) -> None:
    runtime = WorkerRuntime(state_settings)
    try:
        waiting = [inserted(jm, probe_jobs.effect, status="QUEUED") for _ in range(2)]
        claimed = running(jm, probe_jobs.effect, lease_s=60)  # a worker took it meanwhile
        before = time.time()
        bundle_id = runtime.hand_back(probe_jobs.effect.name, [*waiting, claimed], "low", 5)
        for job_id in waiting:
            j = jm.get(job_id)
            assert (j.message_id, j.publish_count) == (bundle_id, 1)
            assert j.queued_at is not None and before <= j.queued_at  # its wait starts now
        assert jm.get(claimed).message_id != bundle_id
        assert jm.get(claimed).publish_count == 0
    finally:
        runtime.publisher.close()
        runtime.engine.dispose()


def test_the_reaper_thread_finishes_old_cancels_then_ticks_until_stopped(
    jm: JobManager, state_settings: Settings
) -> None:
    cancelled = inserted(jm, probe_jobs.noop, status="QUEUED", cancel_requested=True)
    stranded = inserted(jm, probe_jobs.noop, created_at=time.time() - 60)
    settings = state_settings.model_copy(update={"reaper_interval_s": 0.1})
    thread = start_reaper(settings, jm.engine, jm.publisher)
    try:
        deadline = time.monotonic() + 10
        while jm.get(stranded).status is JobStatus.PENDING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert jm.get(stranded).status is JobStatus.QUEUED
        assert jm.get(cancelled).status is JobStatus.CANCELLED
        assert thread.is_alive() and thread.daemon and thread.interval_s == 0.1
    finally:
        thread.stop()
        thread.join(5)
        thread.reaper.close()
    assert not thread.is_alive()


@job(name="tests.state.knows_itself", bind=True)
def knows_itself(ctx: JobContext) -> bool:
    return current_job() is ctx


def test_a_running_job_finds_itself_as_the_current_job(jm: JobManager) -> None:
    job_id = inserted(jm, knows_itself)
    assert executor(jm).run(knows_itself, job_id) == Outcome("succeeded")
    assert jm.get(job_id).result is True
    with pytest.raises(JobError, match="outside a running tasklab job"):
        current_job()
