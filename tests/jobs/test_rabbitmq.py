"""The job layer on RabbitMQ: bundles through the relay, priorities, publisher confirms, the
breaker and the reaper, against the real server (a virtual host of the test's own)."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from amqp.exceptions import MessageNacked
from kombu import Connection, Exchange, Queue  # type: ignore[attr-defined]

import tasklab.lab.probe_jobs  # noqa: F401  (registers the probe jobs)
from tasklab.celery_app import make_celery
from tasklab.jobs.manager import JobManager
from tasklab.jobs.publisher import Publisher
from tasklab.jobs.records import JobStatus, effects, jobs
from tasklab.jobs.recovery import Reaper
from tasklab.lab.netproxy import LinkProxy
from tasklab.migrations import migrate
from tasklab.settings import Settings
from tests.support.rabbitmq import own_vhost
from tests.support.worker import WorkerProcess

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("TEST_RABBITMQ_URL")
    if not url:
        pytest.skip("TEST_RABBITMQ_URL is not set (make test sets it when RabbitMQ answers)")
    with own_vhost(url) as vhost_url:
        yield vhost_url


def _settings(home: Path, broker_url: str, **changes: object) -> Settings:
    defaults: dict[str, object] = {
        "extra_queues": ["rmq-*"],
        "requeue_after_s": 1.0,
        "reaper_interval_s": 0.5,
    }
    settings = Settings(
        home_dir=home, broker_url=broker_url, redis_url=None, **(defaults | changes)
    )
    migrate(settings)
    return settings


@contextlib.contextmanager
def _manager(settings: Settings) -> Iterator[JobManager]:
    jm = JobManager(settings)
    try:
        yield jm
    finally:
        jm.close()


def _wait_final(jm: JobManager, ids: list[str], timeout_s: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        with jm.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(ids)))
            status = {str(i): str(s) for i, s in rows}
        final = {JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED}
        if all(status.get(i) in final for i in ids) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def _effects(jm: JobManager, ids: list[str]) -> dict[str, int]:
    with jm.engine.connect() as conn:
        rows = conn.execute(
            sa.select(effects.c.job_id, sa.func.count())
            .where(effects.c.job_id.in_(ids))
            .group_by(effects.c.job_id)
        )
        return {str(i): int(n) for i, n in rows}


def test_on_rabbitmq_bundled_jobs_each_run_exactly_once(tmp_path: Path, amqp_url: str) -> None:
    settings = _settings(tmp_path, amqp_url)
    queue = f"rmq-bundles-{uuid.uuid4().hex[:6]}"
    with _manager(settings) as jm:
        ids = [jm.submit("tasklab.probe_job.effect", queue=queue).id for _ in range(60)]
        jm.flush()
        worker = WorkerProcess(settings, queues=queue).start()
        try:
            status = _wait_final(jm, ids)
        finally:
            worker.stop()
        assert set(status.values()) == {JobStatus.SUCCEEDED}
        assert _effects(jm, ids) == dict.fromkeys(ids, 1)
        with jm.engine.connect() as conn:
            messages = conn.execute(
                sa.select(sa.func.count(sa.distinct(jobs.c.message_id))).where(jobs.c.id.in_(ids))
            ).scalar_one()
        assert messages < len(ids)  # the relay sent them in bundles


def test_on_rabbitmq_higher_priority_jobs_run_first(tmp_path: Path, amqp_url: str) -> None:
    settings = _settings(tmp_path, amqp_url, worker_prefetch_multiplier=1)
    queue = f"rmq-prio-{uuid.uuid4().hex[:6]}"
    with _manager(settings) as jm:
        low = [jm.submit("tasklab.probe_job.noop", queue=queue, priority=1).id for _ in range(8)]
        jm.flush()
        high = [jm.submit("tasklab.probe_job.noop", queue=queue, priority=9).id for _ in range(8)]
        jm.flush()
        worker = WorkerProcess(settings, queues=queue, concurrency=1).start()
        try:
            _wait_final(jm, low + high)
        finally:
            worker.stop()
        with jm.engine.connect() as conn:
            started = dict(
                conn.execute(
                    sa.select(jobs.c.id, jobs.c.started_at).where(jobs.c.id.in_(low + high))
                ).all()
            )
        # published first, run last: the queue's x-max-priority orders them
        assert max(started[i] for i in high) < min(started[i] for i in low)


def test_on_rabbitmq_a_publish_the_broker_refuses_raises(tmp_path: Path, amqp_url: str) -> None:
    """Publisher confirms: without them a refused message is dropped in silence and its job
    marked QUEUED all the same."""
    settings = _settings(tmp_path, amqp_url)
    name = f"rmq-full-{uuid.uuid4().hex[:6]}"
    full = Queue(
        name,
        Exchange(name),
        routing_key=name,
        queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    with Connection(amqp_url) as conn:  # type: ignore[no-untyped-call]
        full.declare(channel=conn.default_channel)
    try:
        app = make_celery(settings, include=[], for_publishing=True)
        with app.producer_or_acquire() as producer:  # tasklab's producer, its transport options
            producer.publish({"n": 1}, exchange=full.exchange, routing_key=name)
            with pytest.raises(MessageNacked):
                producer.publish({"n": 2}, exchange=full.exchange, routing_key=name)
    finally:
        with Connection(amqp_url) as conn:  # type: ignore[no-untyped-call]
            full.bind(conn.default_channel).delete()


def test_on_rabbitmq_jobs_run_locally_while_the_broker_is_unreachable(
    tmp_path: Path, amqp_url: str
) -> None:
    with LinkProxy.for_url(amqp_url, name="broker") as link:
        settings = _settings(tmp_path, link.url(amqp_url), publish_timeout_s=0.5)
        link.outage()
        with _manager(settings) as jm:
            ids = [jm.submit("tasklab.probe_job.effect").id for _ in range(5)]
            status = _wait_final(jm, ids, timeout_s=30)
            assert set(status.values()) == {JobStatus.SUCCEEDED}
            with jm.engine.connect() as conn:
                via = set(conn.execute(sa.select(jobs.c.via).where(jobs.c.id.in_(ids))).scalars())
            assert via == {"local"}


def test_on_rabbitmq_jobs_whose_messages_vanished_are_published_again(
    tmp_path: Path, amqp_url: str
) -> None:
    queue = f"rmq-lost-{uuid.uuid4().hex[:6]}"
    # named, not a pattern: the reaper watches the queues it can list
    settings = _settings(tmp_path, amqp_url, extra_queues=[queue])
    with _manager(settings) as jm:
        ids = [jm.submit("tasklab.probe_job.effect", queue=queue).id for _ in range(6)]
        jm.flush()
        with Connection(amqp_url) as conn:  # type: ignore[no-untyped-call]
            assert Queue(queue).bind(conn.default_channel).purge() >= 1  # the messages are gone
        reaper = Reaper(settings, jm.engine, Publisher(settings))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _depth(amqp_url, queue) == 0:
            reaper.tick()
            time.sleep(0.3)
        assert _depth(amqp_url, queue) >= 1, "the reaper published nothing again"
        worker = WorkerProcess(settings, queues=queue).start()
        try:
            status = _wait_final(jm, ids)
        finally:
            worker.stop()
        assert set(status.values()) == {JobStatus.SUCCEEDED}
        assert _effects(jm, ids) == dict.fromkeys(ids, 1)


def _depth(url: str, queue: str) -> int:
    with Connection(url) as conn:  # type: ignore[no-untyped-call]
        _, count, _ = conn.default_channel.queue_declare(queue, passive=True)
        return int(count)
