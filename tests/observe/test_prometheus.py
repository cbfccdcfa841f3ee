"""Proof against a real Prometheus: it scrapes tasklab metrics, the series exist and move."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import start_http_server

from tasklab.embedded import free_port
from tasklab.observe.metrics import HTTP_DURATION, JOBS_FINISHED, QUEUE_DEPTH
from tasklab.processes import die_with_parent
from tests.observe.conftest import PROMETHEUS_DIR, require_binary, wait_until

WAIT_S = 20.0
TASK = "tasklab.test.prometheus"


@pytest.fixture
def metrics_port() -> Iterator[int]:
    """This test process's registry on a loopback port, as a tasklab process would serve it."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1")
    yield port
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def prometheus(tmp_path: Path, metrics_port: int) -> Iterator[str]:
    binary = require_binary("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {PROMETHEUS_DIR / 'alerts.yml'}\n"
        "scrape_configs:\n  - job_name: tasklab-api\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n",
        encoding="utf-8",
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url, process), bool, timeout_s=WAIT_S, what="prometheus ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _ready(url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        pytest.fail(f"prometheus exited with code {process.returncode}")
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def query(url: str, promql: str) -> float | None:
    body: dict[str, Any] = httpx.get(
        f"{url}/api/v1/query", params={"query": promql}, timeout=2
    ).json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_tasklab_series_and_sees_them_move(prometheus: str) -> None:
    finished = JOBS_FINISHED.labels(TASK, "default", "succeeded")
    depth = QUEUE_DEPTH.labels("prometheus-test")
    finished.inc(3)
    depth.set(5)
    HTTP_DURATION.labels("GET", "/prometheus-test").observe(0.02)
    jobs = f'sum(tasklab_jobs_finished_total{{task="{TASK}"}})'
    queue = 'tasklab_queue_depth{queue="prometheus-test"}'

    first = wait_until(
        lambda: query(prometheus, jobs),
        lambda v: v is not None,
        timeout_s=WAIT_S,
        what="jobs finished series",
    )
    assert (
        wait_until(
            lambda: query(prometheus, queue),
            lambda v: v == 5,
            timeout_s=WAIT_S,
            what="queue depth 5",
        )
        == 5
    )

    finished.inc(2)
    depth.set(0)

    assert first is not None
    wait_until(
        lambda: query(prometheus, jobs),
        lambda v: v == first + 2,
        timeout_s=WAIT_S,
        what="jobs finished increased by 2",
    )
    wait_until(
        lambda: query(prometheus, queue),
        lambda v: v == 0,
        timeout_s=WAIT_S,
        what="queue depth back to 0",
    )
    count = query(
        prometheus, 'tasklab_http_request_duration_seconds_count{route="/prometheus-test"}'
    )
    assert count is not None and count >= 1


def test_prometheus_loads_every_alert_rule(prometheus: str) -> None:
    def alert_names() -> set[str]:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=2).json()["data"]["groups"]
        return {rule["name"] for group in groups for rule in group["rules"]}

    names = wait_until(alert_names, bool, timeout_s=WAIT_S, what="rules loaded")

    assert {"TasklabWorkerDown", "TasklabQueueBacklog", "TasklabFallbackModeActive"} <= names
    assert len(names) == (PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8").count(
        "- alert: "
    )
