"""Multiprocess mode: several processes' metrics add up in one scrape; dead ones drop out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import Metric

from tasklab.observe import multiproc
from tasklab.observe.registry import api_registry
from tasklab.settings import Settings

CHILD = textwrap.dedent("""
    import os, sys
    from tasklab.observe import metrics, multiproc
    assert multiproc.value_class_matches_env(), "value class chosen without the env var"
    metrics.HTTP_REQUESTS.labels("GET", "/x", "200").inc(int(sys.argv[1]))
    metrics.HTTP_IN_PROGRESS.labels("GET").inc()
    if sys.argv[2] == "clean-exit":
        multiproc.mark_process_dead(os.getpid())
    print(os.getpid())
""")


def run_child(env_dir: Path, increments: int, exit_mode: str) -> int:
    env = {**os.environ, multiproc.ENV_VAR: str(env_dir)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(increments), exit_mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(done.stdout.strip())


def sample(families: list[Metric], name: str, labels: dict[str, str]) -> float | None:
    for family in families:
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


@pytest.fixture
def shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    env = multiproc.prepare_dir(Settings(home_dir=tmp_path / ".tasklab"))
    monkeypatch.setenv(multiproc.ENV_VAR, env[multiproc.ENV_VAR])
    return Path(env[multiproc.ENV_VAR])


def test_prepare_dir_empties_files_left_by_a_previous_run(tmp_path: Path) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab")
    first = Path(multiproc.prepare_dir(settings)[multiproc.ENV_VAR])
    (first / "counter_123.db").write_bytes(b"stale")

    second = Path(multiproc.prepare_dir(settings)[multiproc.ENV_VAR])

    assert second == first == multiproc.dir_for(settings)
    assert list(second.glob("*.db")) == []
    assert second.is_relative_to(settings.home_dir.resolve())


def test_counters_of_several_processes_add_up_in_the_api_registry(shared_dir: Path) -> None:
    run_child(shared_dir, 2, "clean-exit")
    run_child(shared_dir, 3, "clean-exit")

    families = list(api_registry().collect())

    labels = {"method": "GET", "route": "/x", "status": "200"}
    assert sample(families, "tasklab_http_requests_total", labels) == 5


def test_live_gauges_of_a_process_that_died_silently_are_dropped(shared_dir: Path) -> None:
    pid = run_child(shared_dir, 1, "killed")  # exits without mark_process_dead
    assert list(shared_dir.glob(f"gauge_livesum_{pid}.db"))

    families = list(api_registry().collect())

    assert sample(families, "tasklab_http_requests_in_progress", {"method": "GET"}) is None
    assert not list(shared_dir.glob(f"gauge_livesum_{pid}.db"))
    labels = {"method": "GET", "route": "/x", "status": "200"}
    assert sample(families, "tasklab_http_requests_total", labels) == 1


def test_setting_the_variable_after_prometheus_client_was_imported_is_detected(
    shared_dir: Path, tmp_path: Path
) -> None:
    # This test process imported prometheus_client without the variable; the fixture set it.
    problems = multiproc.check(Settings(home_dir=tmp_path / ".tasklab"))

    assert not multiproc.value_class_matches_env()
    assert any("after prometheus_client was imported" in p for p in problems)


CIRCUIT_CHILD = textwrap.dedent("""
    import sys
    from tasklab.observe import metrics
    fallback, redis_up = int(sys.argv[1]), int(sys.argv[2])
    metrics.FALLBACK_ACTIVE.set(fallback)
    metrics.CACHE_REDIS_AVAILABLE.labels("shop").set(redis_up)
    print("set", flush=True)
    if sys.argv[3] == "stay":
        sys.stdin.read()  # alive until the test closes stdin
""")


def start_circuit_child(
    env_dir: Path, fallback: int, redis_up: int, mode: str
) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CIRCUIT_CHILD, str(fallback), str(redis_up), mode],
        env={**os.environ, multiproc.ENV_VAR: str(env_dir)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "set"
    return child


def test_a_process_that_died_with_its_circuits_open_leaves_no_stale_value(shared_dir: Path) -> None:
    healthy = start_circuit_child(shared_dir, fallback=0, redis_up=1, mode="stay")
    try:
        start_circuit_child(shared_dir, fallback=1, redis_up=0, mode="exit").wait(30)

        families = list(api_registry().collect())

        # the dead process's open circuits are gone; the live one's closed circuits remain
        assert sample(families, "tasklab_fallback_active", {}) == 0
        assert sample(families, "tasklab_cache_redis_available", {"cache": "shop"}) == 1
    finally:
        assert healthy.stdin is not None
        healthy.stdin.close()
        healthy.wait(30)

    families = list(api_registry().collect())
    assert sample(families, "tasklab_fallback_active", {}) is None
    assert sample(families, "tasklab_cache_redis_available", {"cache": "shop"}) is None


HISTOGRAM_CHILD = textwrap.dedent("""
    import sys
    from tasklab.observe import metrics
    metrics.JOBS_FINISHED.labels("t", "default", "succeeded").inc(int(sys.argv[1]))
    metrics.JOB_DURATION.labels("t", "default").observe(0.2)
""")


def run_job_child(env_dir: Path, finished: int) -> None:
    subprocess.run(
        [sys.executable, "-c", HISTOGRAM_CHILD, str(finished)],
        env={**os.environ, multiproc.ENV_VAR: str(env_dir)},
        timeout=30,
        check=True,
    )


def per_process_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.db") if multiproc.ARCHIVE not in p.name)


def test_dead_processes_files_are_merged_into_an_archive_and_nothing_is_counted_twice(
    shared_dir: Path,
) -> None:
    for _ in range(4):
        run_job_child(shared_dir, 2)
    # a counter, a histogram and gauge files (those without labels exist from import) each
    assert len([f for f in per_process_files(shared_dir) if f.startswith(("counter", "hist"))]) == 8
    finished = {"task": "t", "queue": "default", "status": "succeeded"}
    runs = {"task": "t", "queue": "default"}

    first = list(api_registry().collect())

    assert per_process_files(shared_dir) == []
    archives = sorted(p.name for p in shared_dir.glob("*.db"))
    assert {"counter_archive.db", "histogram_archive.db"} <= set(archives)
    assert all(name.endswith("_archive.db") for name in archives)
    assert sample(first, "tasklab_jobs_finished_total", finished) == 8
    assert sample(first, "tasklab_job_duration_seconds_count", runs) == 4
    assert sample(first, "tasklab_job_duration_seconds_bucket", {**runs, "le": "0.25"}) == 4

    second = list(api_registry().collect())  # the archive is read, not merged again
    run_job_child(shared_dir, 3)
    third = list(api_registry().collect())

    assert sample(second, "tasklab_jobs_finished_total", finished) == 8
    assert sample(third, "tasklab_jobs_finished_total", finished) == 11
    assert sample(third, "tasklab_job_duration_seconds_count", runs) == 5
    assert per_process_files(shared_dir) == []


def test_a_live_processes_files_are_left_in_place(shared_dir: Path) -> None:
    healthy = start_circuit_child(shared_dir, fallback=0, redis_up=1, mode="stay")
    try:
        run_job_child(shared_dir, 1)
        list(api_registry().collect())

        assert list(shared_dir.glob(f"*_{healthy.pid}.db"))
    finally:
        assert healthy.stdin is not None
        healthy.stdin.close()
        healthy.wait(30)
