"""Proof against a real Prometheus scraping a running `tasklab up` stack: after a short load,
jobs finished increases, the queue depth is back to 0 and the HTTP histogram has counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tasklab.embedded import EmbeddedRedis, free_port
from tasklab.jobs import JobManager, JobStatus
from tasklab.lab import probe_jobs
from tasklab.processes import die_with_parent
from tasklab.settings import Settings
from tests.observe.conftest import require_binary, wait_until
from tests.observe.test_prometheus import query

WAIT_S = 60.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Settings, int, int]]:
    """`tasklab up` (worker, API, exporter) on a Redis of the test's own."""
    broker = EmbeddedRedis(tmp_path / "broker")
    broker.start()
    api_port, exporter_port = free_port(), free_port()
    env = {**os.environ, "REDIS_URL": broker.url, "TASKLAB_HOME_DIR": str(tmp_path / ".tasklab")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tasklab",
            "up",
            "--port",
            str(api_port),
            "--concurrency",
            "1",
            "--no-beat",
            "--exporter-port",
            str(exporter_port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url=broker.url)
    try:
        wait_until(lambda: _health(api_port, proc), bool, timeout_s=WAIT_S, what="API health")
        yield settings, api_port, exporter_port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        broker.stop()


def _health(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "tasklab up exited early"
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def prometheus(tmp_path: Path, stack: tuple[Settings, int, int]) -> Iterator[str]:
    _, api_port, exporter_port = stack
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: tasklab-api\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{api_port}']\n"
        f"  - job_name: tasklab-exporter\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [
            require_binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), bool, timeout_s=WAIT_S, what="prometheus ready")
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_prometheus_sees_a_running_stack_finish_jobs_and_drain_its_queue(
    stack: tuple[Settings, int, int], prometheus: str
) -> None:
    settings, api_port, _ = stack
    jm = JobManager(settings)
    ids = [jm.submit(probe_jobs.noop).id for _ in range(20)]
    assert all(jm.wait(i, timeout_s=WAIT_S).status is JobStatus.SUCCEEDED for i in ids)
    for _ in range(5):
        httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=2)
    jm.close()
    finished = 'sum(tasklab_jobs_finished_total{status="succeeded"})'
    assert (
        wait_until(
            lambda: query(prometheus, finished),
            lambda v: v is not None and v >= 20,
            timeout_s=WAIT_S,
            what="jobs finished >= 20",
        )
        >= 20
    )
    depth = 'sum(tasklab_queue_depth{queue="default"})'
    assert (
        wait_until(
            lambda: query(prometheus, depth),
            lambda v: v == 0,
            timeout_s=WAIT_S,
            what="queue depth back to 0",
        )
        == 0
    )
    http = "sum(tasklab_http_request_duration_seconds_count)"
    assert (
        wait_until(
            lambda: query(prometheus, http),
            lambda v: v is not None and v > 0,
            timeout_s=WAIT_S,
            what="HTTP histogram counts",
        )
        > 0
    )
