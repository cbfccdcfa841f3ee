"""The reaper under a backlog: a job whose message vanished is published again within
``requeue_after_s`` of its message leaving the queue, even though the queue never empties;
jobs still waiting in the queue are left alone; two reapers never publish a job twice.
Against a real Redis of the test's own and real SQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tasklab.database import writing
from tasklab.embedded import EmbeddedRedis
from tasklab.errors import JobDeclarationError, UnknownQueue
from tasklab.jobs import JobManager, JobStatus, job, store
from tasklab.jobs.carriers import redis_list
from tasklab.jobs.publisher import BUNDLE_TASK
from tasklab.jobs.recovery import Reaper
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.jobs.conftest import queued_messages
from tests.support.schema import migrated

REQUEUE_AFTER_S = 1.0


@pytest.fixture
def settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    s = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=broker.url,
        database_url=database_url,
        requeue_after_s=REQUEUE_AFTER_S,
        reaper_interval_s=0.2,
    )
    migrated(s)
    return s


@pytest.fixture
def jm(settings: Settings) -> Iterator[JobManager]:
    manager = JobManager(settings, local_fallback=False)
    yield manager
    manager.close()


@pytest.fixture
def client(broker: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(broker.url)
    yield c
    c.close()


def carried(client: redis.Redis, queue: str) -> list[str]:
    return [
        job_id
        for task, _, args in queued_messages(client, queue)
        for job_id in (args[1] if task == BUNDLE_TASK else args)
    ]


def test_a_job_whose_message_vanished_is_republished_while_the_queue_never_empties(
    jm: JobManager, settings: Settings, client: redis.Redis
) -> None:
    lost = jm.submit(probe_jobs.noop, queue="low")
    assert jm.flush(timeout_s=10)
    # A worker reserved its message, then died: the message is gone from the queue.
    assert client.rpop(redis_list("low", probe_jobs.noop.priority)) is not None
    reaper = Reaper(settings, jm.engine, jm.publisher)
    waiting: list[str] = []
    deadline = time.monotonic() + 4 * REQUEUE_AFTER_S + 2
    while jm.get(lost.id).publish_count < 2 and time.monotonic() < deadline:
        waiting.append(jm.submit(probe_jobs.noop, queue="low").id)  # a backlog, never empty
        assert jm.flush(timeout_s=10)
        reaper.tick()
        time.sleep(0.2)

    assert jm.get(lost.id).publish_count == 2, "the lost job was never published again"
    assert jm.get(lost.id).status is JobStatus.QUEUED
    in_queue = carried(client, "low")
    assert in_queue.count(lost.id) == 1
    # The jobs whose messages still wait in the queue were not published a second time.
    assert {jm.get(i).publish_count for i in waiting} == {1}
    assert sorted(i for i in in_queue if i != lost.id) == sorted(waiting)
    reaper.close()


def test_two_reapers_share_the_stranded_jobs_without_publishing_any_twice(
    jm: JobManager, settings: Settings, client: redis.Redis
) -> None:
    prepared = [jm.prepare(probe_jobs.noop, queue="low") for _ in range(300)]
    with writing(jm.engine) as conn:  # committed, never published (their relay died)
        for p in prepared:
            conn.execute(*p.insert)
        conn.execute(sa.update(store.jobs).values(created_at=time.time() - 60))
    reapers = [Reaper(settings, jm.engine, jm.publisher) for _ in range(2)]
    counts: list[dict[str, int]] = []
    ticks = [threading.Thread(target=lambda r=r: counts.append(r.tick())) for r in reapers]
    for t in ticks:
        t.start()
    for t in ticks:
        t.join(30)

    ids = [p.id for p in prepared]
    assert sum(c["unpublished"] for c in counts) == 300
    assert sorted(carried(client, "low")) == sorted(ids)  # each job in exactly one message
    assert len(queued_messages(client, "low")) <= 300 / settings.bundle_max + 2  # in bundles
    assert {jm.get(i).publish_count for i in ids} == {1}
    for r in reapers:
        r.close()


def test_a_submit_to_a_queue_tasklab_does_not_watch_is_refused_naming_it(
    jm: JobManager,
) -> None:
    with pytest.raises(UnknownQueue, match="'reports'"):
        jm.submit(probe_jobs.noop, queue="reports")
    with pytest.raises(JobDeclarationError, match="'reports'"):
        job(name="tests.recovery.elsewhere", queue="reports")(lambda: None)
    assert jm.counts() == {}
