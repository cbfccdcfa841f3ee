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
