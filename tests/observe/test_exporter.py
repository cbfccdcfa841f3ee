"""``run_exporter``: queue and worker gauges on their own port, nothing else."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasklab.celery_app import broker_priority, make_celery
from tasklab.embedded import EmbeddedRedis, free_port
from tasklab.migrations import migrate
from tasklab.observe.beat import BEAT_HEARTBEAT_TASK
from tasklab.observe.exporter import Exporter, run_exporter
from tasklab.observe.registry import exporter_registry
from tasklab.settings import Settings
from tests.observe.conftest import wait_until

WAIT_S = 20.0
SUCCESS = "tasklab_exporter_refresh_success"
LAST_SUCCESS = "tasklab_exporter_last_success_timestamp_seconds"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def exporter_port(settings: Settings) -> Iterator[int]:
    port = free_port()
    stop = threading.Event()
    thread = threading.Thread(
        target=run_exporter,
        args=(settings, port),
        kwargs={"host": "127.0.0.1", "interval_s": 0.2, "stop": stop},
    )
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    yield port
    stop.set()
    thread.join(15)
    assert not thread.is_alive()


def test_the_exporter_serves_queue_depth_and_beats_last_dispatch(
    exporter_port: int, settings: Settings
) -> None:
    celery = make_celery(settings)
    try:
        for _ in range(3):
            celery.send_task(
                "tasklab.probe.noop", queue="default", priority=broker_priority(settings, 7)
            )
        depth_key = ("tasklab_queue_depth", (("queue", "default"),))
        beat_key = ("tasklab_beat_last_run_timestamp_seconds", ())
        deadline = time.monotonic() + WAIT_S
        samples = scrape(exporter_port)
        while (
            samples.get(depth_key) != 3 or not samples.get(beat_key)
        ) and time.monotonic() < deadline:
            celery.send_task(BEAT_HEARTBEAT_TASK, queue="scheduled", expires=60)
            time.sleep(0.2)  # the exporter refreshes every 0.2 s
            samples = scrape(exporter_port)
    finally:
        celery.close()

    assert samples[depth_key] == 3
    assert (
        samples[("tasklab_queue_depth_by_priority", (("priority", "7"), ("queue", "default")))] == 3
    )
    assert samples[beat_key] > time.time() - 60
    assert samples[("tasklab_workers_up", ())] == 0
    assert ("process_resident_memory_bytes", ()) in samples
    assert not [name for name, _ in samples if name.startswith("tasklab_http_")]


@pytest.mark.slow
def test_when_the_broker_goes_away_the_backlog_gauges_are_dropped_and_freshness_says_so(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url=server.url)
    migrate(settings)
    exporter = Exporter(settings)
    registry = exporter_registry()
    try:
        celery = make_celery(settings)
        celery.send_task(BEAT_HEARTBEAT_TASK, queue="low")
        celery.close()
        exporter.workers.start()
        wait_until(lambda: exporter.workers.receiving, bool, timeout_s=20, what="events")
        exporter.refresh()
        fresh_at = registry.get_sample_value(LAST_SUCCESS, {"source": "broker"}) or 0.0
        assert registry.get_sample_value(SUCCESS, {"source": "workers"}) == 1

        assert registry.get_sample_value("tasklab_queue_depth", {"queue": "low"}) == 1
        assert registry.get_sample_value(SUCCESS, {"source": "broker"}) == 1
        assert registry.get_sample_value(SUCCESS, {"source": "database"}) == 1
        assert fresh_at > 0

        server.stop()
        wait_until(lambda: exporter.workers.receiving, lambda r: not r, timeout_s=20, what="loss")
        exporter.refresh()

        assert registry.get_sample_value(SUCCESS, {"source": "broker"}) == 0
        assert registry.get_sample_value(SUCCESS, {"source": "workers"}) == 0
        assert registry.get_sample_value(LAST_SUCCESS, {"source": "broker"}) == fresh_at
        for name in ("tasklab_queue_depth", "tasklab_queue_unacked"):
            assert registry.get_sample_value(name, {"queue": "low"}) is None, name
        # the database still answers: its figures stay, and fresh
        assert registry.get_sample_value(SUCCESS, {"source": "database"}) == 1
        assert (
            registry.get_sample_value("tasklab_queue_oldest_job_age_seconds", {"queue": "low"})
            is not None
        )

        server.start()  # same port: the broker is back
        exporter.refresh()

        assert registry.get_sample_value(SUCCESS, {"source": "broker"}) == 1
        assert (registry.get_sample_value(LAST_SUCCESS, {"source": "broker"}) or 0.0) > fresh_at
        assert registry.get_sample_value("tasklab_queue_depth", {"queue": "low"}) is not None
    finally:
        exporter.close()
        server.stop()


def test_when_the_database_goes_away_its_figures_are_dropped_not_zeroed(
    tmp_path: Path, settings: Settings
) -> None:
    db = tmp_path / "jobs.db"
    local = settings.model_copy(update={"database_url": f"sqlite:///{db}"})
    migrate(local)
    exporter = Exporter(local)
    registry = exporter_registry()
    try:
        exporter.refresh()
        assert registry.get_sample_value(SUCCESS, {"source": "database"}) == 1
        assert (
            registry.get_sample_value("tasklab_queue_oldest_job_age_seconds", {"queue": "low"}) == 0
        )

        db.unlink()
        db.mkdir()  # a path that cannot be opened as a database any more
        assert exporter._engine is not None
        exporter._engine.dispose()  # pooled connections would still reach the unlinked file
        exporter.refresh()

        assert registry.get_sample_value(SUCCESS, {"source": "database"}) == 0
        assert (
            registry.get_sample_value("tasklab_queue_oldest_job_age_seconds", {"queue": "low"})
            is None
        )
        assert registry.get_sample_value(SUCCESS, {"source": "broker"}) == 1
    finally:
        exporter.close()
