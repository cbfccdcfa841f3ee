"""A real Prometheus scrapes two worker nodes through the shipped file_sd job."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tasklab.jobs import JobManager, JobStatus
from tasklab.lab import probe_jobs
from tasklab.migrations import migrate
from tasklab.ports import free_port_on
from tasklab.processes import die_with_parent
from tasklab.settings import Settings
from tests.observe.conftest import PROMETHEUS_DIR, require_binary, wait_until
from tests.observe.test_prometheus import _ready
from tests.support.worker import WorkerProcess

WAIT_S = 30.0


def shipped_workers_job(targets_file: Path) -> dict[str, Any]:
    """The `tasklab-workers` job of deploy/prometheus/prometheus.yml, on a targets file here."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "tasklab-workers"]
    [sd] = job["file_sd_configs"]
    sd["files"] = [str(targets_file)]
    return {**job, "scrape_interval": "1s", "scrape_timeout": "1s"}


def alert_expr(name: str) -> str:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    [rule] = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == name]
    return str(rule["expr"])


def query(url: str, promql: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=2).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(url: str, promql: str) -> float | None:
    result = query(url, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def nodes(
    settings: Settings, worker_factory: type[WorkerProcess]
) -> list[tuple[WorkerProcess, int]]:
    migrate(settings)
    started = []
    for name in ("node-a", "node-b"):
        port = free_port_on("127.0.0.1")
        worker = worker_factory(settings, concurrency=1, name=name)
        worker.argv += ["--metrics-port", str(port)]
        started.append((worker.spawn(), port))
    for worker, _ in started:  # both import at once
        worker.wait_ready(60)
    return started


@pytest.fixture
def prometheus(tmp_path: Path, nodes: list[tuple[WorkerProcess, int]]) -> Iterator[str]:
    targets = tmp_path / "workers.yml"
    targets.write_text(
        yaml.safe_dump([{"targets": [f"127.0.0.1:{port}" for _, port in nodes]}]),
        encoding="utf-8",
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
                "scrape_configs": [shipped_workers_job(targets)],
            }
        ),
        encoding="utf-8",
    )
    port = free_port_on("127.0.0.1")
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            require_binary("prometheus"),
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
        process.wait(10)
        log.close()


@pytest.mark.slow
def test_prometheus_sees_both_worker_nodes_jobs_and_memory_and_a_killed_node_goes_down(
    settings: Settings, nodes: list[tuple[WorkerProcess, int]], prometheus: str
) -> None:
    jm = JobManager(settings)
    try:
        ids = [jm.submit(probe_jobs.noop).id for _ in range(6)]
        assert all(jm.wait(i, timeout_s=60).status is JobStatus.SUCCEEDED for i in ids)
    finally:
        jm.close()
    finished = 'sum(tasklab_jobs_finished_total{job="tasklab-workers", status="succeeded"})'

    wait_until(
        lambda: scalar(prometheus, finished),
        lambda v: v == 6,
        timeout_s=WAIT_S,
        what="6 finished jobs summed over the nodes",
    )
    # a scrape may time out on a busy machine: both up within the wait, not at one instant
    wait_until(
        lambda: scalar(prometheus, 'count(up{job="tasklab-workers"} == 1)'),
        lambda v: v == 2,
        timeout_s=WAIT_S,
        what="both worker nodes up",
    )
    rss = query(prometheus, "tasklab_worker_node_rss_bytes")
    assert len(rss) == 2 and all(float(r["value"][1]) > 0 for r in rss)

    killed, killed_port = nodes[0]
    killed.kill()
    target_down = alert_expr("TasklabTargetDown")
    down = wait_until(
        lambda: query(prometheus, target_down),
        lambda r: len(r) == 1,
        timeout_s=WAIT_S,
        what="the killed node down",
    )
    assert down[0]["metric"]["instance"] == f"127.0.0.1:{killed_port}"
