"""Queue depth on real Redis: every priority sub-list, in-flight messages, oldest waiting job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from prometheus_client import REGISTRY

from tasklab.celery_app import broker_priority, make_celery
from tasklab.database import make_engine
from tasklab.jobs import JobManager, JobStatus
from tasklab.lab import probe_jobs
from tasklab.migrations import migrate
from tasklab.observe.queues import (
    QueueDepth,
    QueueGauges,
    QueueProbe,
    QueueSnapshot,
    jobs_by_status,
    oldest_waiting_ages,
    redis_queue_depths,
    redis_unacked,
    redis_unacked_by_queue,
)
from tasklab.settings import Settings
from tests.observe.conftest import wait_until


@pytest.fixture
def celery(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def publish(celery: Celery, settings: Settings, *, queue: str, priority: int, n: int) -> None:
    for _ in range(n):
        celery.send_task(
            "tasklab.probe.noop", queue=queue, priority=broker_priority(settings, priority)
        )


def test_depth_is_summed_over_every_priority_sub_list(
    celery: Celery, settings: Settings, client: redis.Redis
) -> None:
    publish(celery, settings, queue="default", priority=9, n=2)
    publish(celery, settings, queue="default", priority=5, n=3)
    publish(celery, settings, queue="default", priority=0, n=1)
    publish(celery, settings, queue="high", priority=5, n=1)

    depths = redis_queue_depths(client, ["default", "high", "low"])

    assert client.llen("default") == 2  # what LLEN of the queue name alone would report
    assert depths["default"].total == 6
    assert {p: n for p, n in depths["default"].by_priority.items() if n} == {9: 2, 5: 3, 0: 1}
    assert depths["high"].total == 1
    assert depths["low"] == QueueDepth("low", 0, dict.fromkeys(range(10), 0))


def test_a_delivered_unacknowledged_message_is_in_flight_not_waiting(
    celery: Celery, settings: Settings, client: redis.Redis
) -> None:
    publish(celery, settings, queue="default", priority=5, n=3)

    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        message = channel.basic_get(queue="default", no_ack=False)
        assert message is not None

        assert redis_queue_depths(client, ["default"])["default"].total == 2
        assert redis_unacked(client) == 1
        assert redis_unacked_by_queue(client, ["default", "high"]) == {"default": 1, "high": 0}

        message.ack()
        assert redis_unacked(client) == 0
        assert redis_unacked_by_queue(client, ["default"]) == {"default": 0}


def test_the_probe_and_gauges_publish_depths_per_queue_and_priority(
    celery: Celery, settings: Settings
) -> None:
    publish(celery, settings, queue="low", priority=2, n=4)
    probe = QueueProbe(settings)
    try:
        snapshot = probe.snapshot()
    finally:
        probe.close()

    QueueGauges().record(snapshot)

    assert REGISTRY.get_sample_value("tasklab_queue_depth", {"queue": "low"}) == 4
    assert (
        REGISTRY.get_sample_value(
            "tasklab_queue_depth_by_priority", {"queue": "low", "priority": "2"}
        )
        == 4
    )
    assert REGISTRY.get_sample_value("tasklab_queue_depth", {"queue": "default"}) == 0
    assert REGISTRY.get_sample_value("tasklab_queue_unacked", {"queue": "low"}) == 0
    assert snapshot.unacked == 0
    # Redis does not know its consumers: no sample, not 0
    assert snapshot.depths["low"].consumers is None
    assert REGISTRY.get_sample_value("tasklab_queue_consumers", {"queue": "low"}) is None


# --- oldest waiting job (SQL job records) -----------------------------------------------------
@pytest.fixture
def engine(tmp_path: Path, database_url: str | None) -> Iterator[sa.Engine]:
    """The job database on SQLite, and on PostgreSQL when TEST_POSTGRES_URL is set."""
    engine = make_engine(Settings(home_dir=tmp_path / ".tasklab", database_url=database_url))
    yield engine
    engine.dispose()


def create_jobs_table(engine: sa.Engine, rows: list[dict[str, object]]) -> None:
    meta = sa.MetaData()
    table = sa.Table(
        "tasklab_jobs",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16)),
        sa.Column("queue", sa.String(64)),
        sa.Column("queued_at", sa.Float),
        sa.Column("created_at", sa.Float),
        sa.Column("next_attempt_at", sa.Float),
    )
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            table.insert(), [{"queued_at": None, "next_attempt_at": None, **r} for r in rows]
        )


def test_the_oldest_waiting_job_age_comes_from_the_job_records(engine: sa.Engine) -> None:
    now = 1_000_000.0
    create_jobs_table(
        engine,
        [
            {
                "status": "QUEUED",
                "queue": "default",
                "queued_at": now - 100,
                "created_at": now - 100,
            },
            {"status": "PENDING", "queue": "default", "created_at": now - 250},  # never published
            {
                "status": "RETRYING",
                "queue": "high",
                "queued_at": now - 900,
                "created_at": now - 900,
                "next_attempt_at": now - 30,
            },  # due 30 s ago
            {
                "status": "RETRYING",
                "queue": "high",
                "queued_at": now - 999,
                "created_at": now - 999,
                "next_attempt_at": now + 60,
            },  # not due yet: not waiting
            {
                "status": "STARTED",
                "queue": "low",
                "queued_at": now - 5000,
                "created_at": now - 5000,
            },
            {
                "status": "SUCCEEDED",
                "queue": "low",
                "queued_at": now - 9000,
                "created_at": now - 9000,
            },
        ],
    )

    ages = oldest_waiting_ages(engine, now=now)

    assert ages == {"default": 250.0, "high": 30.0}
    assert jobs_by_status(engine) == {
        "QUEUED": 1,
        "PENDING": 1,
        "RETRYING": 2,
        "STARTED": 1,
        "SUCCEEDED": 1,
    }


def test_a_countdown_job_waits_from_when_it_became_due_not_from_its_submit(
    engine: sa.Engine,
) -> None:
    now = 1_000_000.0
    create_jobs_table(
        engine,
        [  # both submitted 2 hours ago
            {
                "status": "QUEUED",
                "queue": "default",
                "queued_at": now - 7200,
                "created_at": now - 7200,
                "next_attempt_at": now - 40,
            },  # countdown ended 40 s ago
            {
                "status": "QUEUED",
                "queue": "low",
                "queued_at": now - 7200,
                "created_at": now - 7200,
                "next_attempt_at": now + 3600,
            },  # due in an hour: not waiting
        ],
    )

    assert oldest_waiting_ages(engine, now=now) == {"default": 40.0}


@pytest.mark.slow
def test_a_job_submitted_with_a_countdown_is_not_waiting_until_it_is_due(
    settings: Settings,
) -> None:
    migrate(settings)
    jm = JobManager(settings)
    engine = make_engine(settings)
    try:
        job = jm.submit(probe_jobs.noop, countdown_s=600, queue="low")
        wait_until(
            lambda: jm.get(job.id).status,
            lambda s: s is JobStatus.QUEUED,
            timeout_s=10,
            what="the countdown job to be published",
        )
        later = time.time() + 300  # 5 minutes after its submit, 5 before it is due

        assert "low" not in oldest_waiting_ages(engine, now=later)
        assert 0 < oldest_waiting_ages(engine, now=time.time() + 630)["low"] < 60
    finally:
        jm.close()
        engine.dispose()


def test_a_database_without_the_job_table_yet_reports_nothing(engine: sa.Engine) -> None:
    assert oldest_waiting_ages(engine) == {}
    assert jobs_by_status(engine) == {}


def test_a_status_or_queue_that_disappears_is_set_back_to_zero() -> None:
    gauges = QueueGauges()
    gauges.record(QueueSnapshot({}, None, {"data_sync": 42.0}, {"DEAD": 2}))

    gauges.record(QueueSnapshot({}, None, {}, {}))

    assert (
        REGISTRY.get_sample_value("tasklab_queue_oldest_job_age_seconds", {"queue": "data_sync"})
        == 0
    )
    assert REGISTRY.get_sample_value("tasklab_jobs", {"status": "DEAD"}) == 0


def test_ages_are_measured_against_the_current_time_by_default(engine: sa.Engine) -> None:
    create_jobs_table(
        engine,
        [
            {
                "status": "QUEUED",
                "queue": "default",
                "queued_at": time.time() - 60,
                "created_at": 0.0,
            }
        ],
    )

    age = oldest_waiting_ages(engine)["default"]

    assert 60 <= age < 120
