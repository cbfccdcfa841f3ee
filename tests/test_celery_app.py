from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tasklab.celery_app import QUEUES, broker_priority, make_celery
from tasklab.jobs import JobManager, JobStatus
from tasklab.lab import probe_jobs
from tasklab.migrations import migrate
from tasklab.settings import Settings
from tests.conftest import required_url
from tests.support.worker import WorkerProcess


def test_the_production_defaults_are_set() -> None:
    s = Settings(redis_url="redis://127.0.0.1:1/0", visibility_timeout_s=4000)
    conf = make_celery(s).conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    # per-task events off (Flower asks for them); beat's task-sent on: the exporter sees beat
    assert not conf.worker_send_task_events and conf.task_send_sent_event
    assert make_celery(s.model_copy(update={"task_events": True})).conf.worker_send_task_events
    assert not make_celery(s, for_publishing=True).conf.task_send_sent_event
    assert conf.result_expires == s.result_expires_s
    assert conf.worker_max_tasks_per_child and conf.worker_max_memory_per_child
    assert conf.task_soft_time_limit < conf.task_time_limit
    # every place Celery reads the visibility timeout agrees
    assert conf.broker_transport_options["visibility_timeout"] == 4000
    assert conf.result_backend_transport_options["visibility_timeout"] == 4000
    assert conf.visibility_timeout == 4000
    assert conf.broker_transport_options["priority_steps"] == list(range(10))
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert [q.name for q in conf.task_queues] == list(QUEUES)


def test_the_visibility_timeout_outlasts_the_hard_time_limit() -> None:
    s = Settings()
    assert s.visibility_timeout_s > s.task_time_limit_s


def test_priorities_are_mirrored_on_redis_only() -> None:
    redis_s = Settings(redis_url="redis://h:1/0")
    amqp_s = Settings(broker_url="amqp://g:g@h:5672//")
    assert broker_priority(redis_s, 9) == 0 and broker_priority(redis_s, 0) == 9
    assert broker_priority(amqp_s, 9) == 9
    queues = make_celery(amqp_s).conf.task_queues
    assert all(q.queue_arguments == {"x-max-priority": 9} for q in queues)
    quorum = make_celery(amqp_s.model_copy(update={"amqp_queue_type": "quorum"}))
    assert all(q.queue_arguments == {"x-queue-type": "quorum"} for q in quorum.conf.task_queues)


def test_pickle_is_refused_by_the_worker_config() -> None:
    conf = make_celery(Settings(redis_url="redis://h:1/0")).conf
    assert "pickle" not in conf.accept_content and "pickle" not in conf.result_accept_content


def round_trip(settings: Settings, worker_factory) -> None:
    worker_factory(settings).start()
    app = make_celery(settings)
    sent = time.time()
    result = app.send_task("tasklab.probe.noop", kwargs={"sent_at": sent}).get(timeout=30)
    assert result["sent_at"] == sent and result["finished_at"] >= sent
    app.close()


def test_a_task_round_trips_through_embedded_redis_and_a_real_worker(
    settings, worker_factory
) -> None:
    round_trip(settings, worker_factory)


@pytest.mark.redis_server
def test_a_task_round_trips_through_the_standard_redis_server(
    tmp_path: Path, worker_factory
) -> None:
    url = required_url("TEST_REDIS_URL")
    assert not url.rstrip("/").endswith("/0"), "tests never use db 0 of a shared server"
    import redis

    redis.Redis.from_url(url).flushdb()
    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url=url, worker_concurrency=1)
    round_trip(settings, worker_factory)


@pytest.mark.rabbitmq
def test_tasks_and_durable_jobs_round_trip_through_rabbitmq(
    tmp_path: Path, redis_url: str, worker_factory
) -> None:
    url = required_url("TEST_RABBITMQ_URL")
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        broker_url=url,
        result_backend=redis_url,
        worker_concurrency=1,
    )
    migrate(settings)
    round_trip(settings, worker_factory)
    jm = JobManager(settings)
    j = jm.submit(probe_jobs.effect, priority=9)
    assert jm.wait(j.id, timeout_s=30).status is JobStatus.SUCCEEDED
    jm.close()


def test_worker_processes_run_at_the_configured_nice_value(
    settings: Settings, worker_factory: type[WorkerProcess]
) -> None:
    base = psutil.Process().nice()
    worker = worker_factory(settings.model_copy(update={"worker_nice": 7}), name="niced").start()
    assert worker.process is not None
    niced = [worker.process.pid, *worker.child_pids()]
    assert len(niced) >= 2  # the main process and its pool
    assert {psutil.Process(pid).nice() for pid in niced} == {min(19, base + 7)}


def test_running_tasks_are_cancelled_on_connection_loss_only_with_rabbitmq(
    tmp_path: Path,
) -> None:
    """On Redis the cancel gains nothing and can wedge the pool (docs/celery-config.md)."""
    redis_app = make_celery(Settings(home_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))
    amqp_app = make_celery(
        Settings(home_dir=tmp_path, broker_url="amqp://guest:guest@127.0.0.1:5672//")
    )
    assert redis_app.conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert amqp_app.conf.worker_cancel_long_running_tasks_on_connection_loss is True


def test_a_worker_freezes_its_heap_before_it_forks_its_pool(tmp_path: Path) -> None:
    """Pool processes then share the main process's pages instead of copying each one their
    collector touches (worker PSS, docs/jobs.md "Memory")."""
    import gc

    from celery import signals

    from tasklab.worker import build_worker_app

    gc.unfreeze()
    build_worker_app(Settings(home_dir=tmp_path, redis_url="redis://127.0.0.1:6379/0"))
    try:
        signals.worker_init.send(sender=None)
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
