"""The reaper's paths, in-process against real SQL and a Redis broker of the test's own: each
expired lease ends as it must, refused and countdown publishes, the relay's grace, extra
queues, backlogs of several batches, flushes, hung brokers, hand-backs and the reaper thread."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tasklab.database import writing
from tasklab.embedded import EmbeddedRedis
from tasklab.jobs import JobManager, JobStatus, store
from tasklab.jobs.records import effects
from tasklab.jobs.recovery import BATCH, Reaper, _epoch_start, start_reaper
from tasklab.jobs.worker_side import WorkerRuntime
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.jobs import states
from tests.jobs.states import (
    RETENTION_DAYS,
    carried,
    flaky,
    gives_up,
    inserted,
    lose_the_message_of,
    next_attempt_at,
    running,
)
from tests.support.frozen import FrozenServer


@pytest.fixture
def state_settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    return states.settings_for(tmp_path, broker, database_url)


@pytest.fixture
def jm(state_settings: Settings) -> Iterator[JobManager]:
    yield from states.manager_for(state_settings)


@pytest.fixture
def reaper(state_settings: Settings, jm: JobManager) -> Iterator[Reaper]:
    yield from states.reaper_for(state_settings, jm)


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
    ended = inserted(jm, gives_up, status="CANCELLED", cancel_requested=True, finished_at=3.0)
    before = time.time()
    reaper.finish_old_cancels()
    assert jm.get(ended).finished_at == 3.0  # a job that ended is left as it ended
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
