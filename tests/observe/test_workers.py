"""Worker gauges from a real Celery worker's heartbeats and ``inspect stats``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from celery import Celery
from celery.signals import beat_init, before_task_publish
from prometheus_client import REGISTRY

from tasklab.celery_app import make_celery
from tasklab.observe.beat import (
    BEAT_HEARTBEAT_TASK,
    beat_schedule_entries,
    connect_beat_signals,
)
from tasklab.observe.workers import WorkerMonitor, WorkerSnapshot
from tasklab.settings import Settings
from tests.support.worker import WorkerProcess

WAIT_S = 20.0


def wait_for(monitor: WorkerMonitor, accept: Callable[[WorkerSnapshot], bool]) -> WorkerSnapshot:
    """Poll snapshots (each takes ~1 s of inspect) until one is accepted or WAIT_S passes."""
    deadline = time.monotonic() + WAIT_S
    snapshot = monitor.snapshot()
    while not accept(snapshot) and time.monotonic() < deadline:
        snapshot = monitor.snapshot()
    return snapshot


@pytest.fixture
def celery(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def monitor(celery: Celery) -> Iterator[WorkerMonitor]:
    monitor = WorkerMonitor(celery, inspect_timeout_s=0.5).start()
    yield monitor
    monitor.stop()


@pytest.mark.slow
def test_a_running_worker_is_up_with_its_processes_memory_and_a_fresh_heartbeat(
    monitor: WorkerMonitor, worker_factory: type[WorkerProcess], settings: Settings
) -> None:
    worker = worker_factory(settings, concurrency=2).start()

    up = wait_for(
        monitor, lambda s: s.workers_up == 1 and s.heartbeat_age_s > 0 and s.processes == 2
    )
    up.record()

    assert up.workers_up == 1
    assert up.processes == 2
    assert up.rss_bytes > 10 * 1024 * 1024  # main process + 2 children, tens of MB each
    assert 0 < up.heartbeat_age_s < 10
    assert up.active_tasks == 0
    assert REGISTRY.get_sample_value("tasklab_workers_up") == 1
    assert REGISTRY.get_sample_value("tasklab_worker_processes") == 2

    worker.stop()
    down = wait_for(monitor, lambda s: s.workers_up == 0)

    assert down.workers_up == 0
    assert down.processes == 0


def test_without_workers_nothing_is_up(monitor: WorkerMonitor) -> None:
    snapshot = monitor.snapshot()

    assert snapshot == WorkerSnapshot(0, 0, 0, 0, 0.0, None)


def test_beats_heartbeat_task_sent_event_gives_beats_last_dispatch(
    monitor: WorkerMonitor, celery: Celery
) -> None:
    started = time.time()
    deadline = time.monotonic() + WAIT_S
    # The event receiver binds asynchronously; events sent before it listens are not queued.
    while monitor.snapshot().beat_last_sent_at is None and time.monotonic() < deadline:
        celery.send_task(BEAT_HEARTBEAT_TASK, queue="scheduled")

    sent_at = monitor.snapshot().beat_last_sent_at
    assert sent_at is not None
    assert started - 1 <= sent_at <= time.time() + 1


def test_in_the_beat_process_every_publish_marks_beats_last_run(celery: Celery) -> None:
    connect_beat_signals()
    beat_init.send(sender=None)
    try:
        before = time.time()
        celery.send_task("tasklab.probe.noop", queue="low")

        last_run = REGISTRY.get_sample_value("tasklab_beat_last_run_timestamp_seconds")
        assert last_run is not None and last_run >= before
    finally:
        before_task_publish.disconnect(dispatch_uid="tasklab.observe.beat.publish")


def test_the_heartbeat_schedule_entry_goes_to_the_scheduled_queue_and_expires() -> None:
    [entry] = beat_schedule_entries(interval_s=15).values()

    assert entry["task"] == BEAT_HEARTBEAT_TASK
    assert entry["schedule"] == 15
    assert entry["options"] == {"queue": "scheduled", "expires": 15}
