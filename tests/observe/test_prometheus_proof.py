"""The proof against real servers: a real Prometheus scrapes two worker nodes, the API and the
exporter with the shipped rules (their `for:` shortened in a copy); a node is killed, a queue
flooded and jobs dead-lettered, and the alerts that must fire do, while every dashboard panel's
query returns data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tasklab.jobs import JobManager, JobStatus
from tasklab.lab import probe_jobs
from tasklab.ports import free_port_on
from tasklab.processes import die_with_parent
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.observe.conftest import DASHBOARD, PROMETHEUS_DIR, require_binary, wait_until
from tests.observe.test_assets import dashboard_exprs
from tests.observe.test_prometheus import _ready
from tests.observe.test_prometheus_nodes import query, shipped_workers_job
from tests.service.conftest import read_tokens
from tests.support.worker import WorkerProcess, child_env

WAIT_S = 45.0
SHORT_FOR = "2s"
FLOODED = "low"  # no node consumes it
FLOOD = 120  # over TasklabQueueBacklog's 100
JOBS_A_WAVE = 10
DEAD_A_WAVE = 2
# Panels whose series only a condition this test does not create can fill: none (a panel of
# failures shows 0 while there are none; the reaper's ticks fill the @profiled panel).
QUIET_PANELS: set[str] = set()


def shortened_rules(tmp_path: Path) -> list[str]:
    """Copies of rules.yml and alerts.yml with every `for:` at SHORT_FOR (shipped ones kept)."""
    paths = []
    for name in ("rules.yml", "alerts.yml"):
        doc = yaml.safe_load((PROMETHEUS_DIR / name).read_text(encoding="utf-8"))
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = SHORT_FOR
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        paths.append(str(path))
    return paths


class Service:
    """A `tasklab <command>` subprocess of this test, stopped by its own pid."""

    def __init__(self, settings: Settings, log: Path, *argv: str) -> None:
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tasklab", *argv],
            env=child_env(settings),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def answers(self, url: str) -> bool:
        assert self.process.poll() is None, f"{self.process.args!r} exited early"
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()


@pytest.fixture
def proof_settings(settings: Settings) -> Settings:
    # Task events feed the exporter's Celery-task metrics; every query counts as slow so the
    # slow-query panel has data.
    proof = settings.model_copy(update={"task_events": True, "slow_query_ms": 0.0})
    seed(proof, users=2, products=5, stock=10, points=0)
    return proof


@pytest.fixture
def services(proof_settings: Settings, tmp_path: Path) -> Iterator[dict[str, int]]:
    ports = {"api": free_port_on("127.0.0.1"), "exporter": free_port_on("127.0.0.1")}
    api = Service(
        proof_settings,
        tmp_path / "api.log",
        "api",
        "--host",
        "127.0.0.1",
        "--port",
        str(ports["api"]),
    )
    exporter = Service(
        proof_settings,
        tmp_path / "exporter.log",
        "exporter",
        "--host",
        "127.0.0.1",
        "--port",
        str(ports["exporter"]),
        "--interval",
        "1",
    )
    try:
        for name, service in (("api", api), ("exporter", exporter)):
            url = f"http://127.0.0.1:{ports[name]}/metrics"
            wait_until(partial(service.answers, url), bool, timeout_s=WAIT_S, what=f"{name} up")
        yield ports
    finally:
        api.stop()
        exporter.stop()


@pytest.fixture
def nodes(
    proof_settings: Settings, worker_factory: type[WorkerProcess]
) -> list[tuple[WorkerProcess, int]]:
    started = []
    for name in ("node-a", "node-b"):
        port = free_port_on("127.0.0.1")
        worker = worker_factory(proof_settings, concurrency=1, name=name, queues="high,default")
        worker.argv += ["--metrics-port", str(port)]
        started.append((worker.spawn(), port))
    for worker, _ in started:  # both import at once
        worker.wait_ready(60)
    return started


@pytest.fixture
def prometheus(
    tmp_path: Path, services: dict[str, int], nodes: list[tuple[WorkerProcess, int]]
) -> Iterator[str]:
    targets = tmp_path / "workers.yml"
    targets.write_text(
        yaml.safe_dump([{"targets": [f"127.0.0.1:{port}" for _, port in nodes]}]),
        encoding="utf-8",
    )
    fast = {"scrape_interval": "1s", "scrape_timeout": "1s"}
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": shortened_rules(tmp_path),
                "scrape_configs": [
                    shipped_workers_job(targets),
                    *(
                        {"job_name": name, **fast, "static_configs": [{"targets": [address]}]}
                        for name, address in (
                            ("tasklab-api", f"127.0.0.1:{services['api']}"),
                            ("tasklab-exporter", f"127.0.0.1:{services['exporter']}"),
                        )
                    ),
                ],
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
        wait_until(
            lambda: query(url, 'count(up{job=~"tasklab-.*"} == 1)'),
            lambda r: bool(r) and r[0]["value"][1] == "4",
            timeout_s=WAIT_S,
            what="the API, the exporter and both nodes scraped",
        )
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def firing(url: str, alert: str) -> list[dict[str, str]]:
    return [r["metric"] for r in query(url, f'ALERTS{{alertname="{alert}", alertstate="firing"}}')]


def panel_queries() -> dict[str, list[str]]:
    """Each dashboard panel's queries, with the dashboard's variables at All and a rate
    window that spans this whole test."""
    panels: dict[str, list[str]] = {}
    for panel in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if exprs:
            panels[panel["title"]] = [
                re.sub(r"\$(queue|task|instance)\b", ".*", e).replace("$__rate_interval", "5m")
                for e in exprs
            ]
    assert sum(len(e) for e in panels.values()) == len(list(dashboard_exprs()))
    return panels


def traffic(jm: JobManager, api: str, token: str) -> None:
    """A wave of jobs (some dead-lettered after their retries) and of catalog reads."""
    done = [jm.submit(probe_jobs.noop).id for _ in range(JOBS_A_WAVE - DEAD_A_WAVE)]
    dead = [jm.submit(probe_jobs.fail, "proof").id for _ in range(DEAD_A_WAVE)]
    for product in range(1, 6):
        httpx.get(f"{api}/api/v1/products/{product}", headers={"Authorization": f"Bearer {token}"})
    assert all(jm.wait(i, timeout_s=60).status is JobStatus.SUCCEEDED for i in done)
    assert all(jm.wait(i, timeout_s=60).status is JobStatus.DEAD for i in dead)


def at_least(n: float, result: list[dict[str, Any]]) -> bool:
    return bool(result) and float(result[0]["value"][1]) >= n


def has_data(url: str, promql: str) -> bool:
    return any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in query(url, promql))


@pytest.mark.slow
def test_alerts_fire_on_a_killed_node_a_flooded_queue_and_dead_letters_and_every_panel_has_data(
    settings: Settings,
    services: dict[str, int],
    nodes: list[tuple[WorkerProcess, int]],
    prometheus: str,
) -> None:
    token = read_tokens(settings.home_dir / "tokens.jsonl")[0].token
    panels = panel_queries()

    def unfilled() -> set[str]:
        return {t for t, exprs in panels.items() if not any(has_data(prometheus, e) for e in exprs)}

    # Traffic in waves, each seen by Prometheus before the next, so every counter and
    # histogram moves between scrapes (a series born at its final value has no rate).
    jm = JobManager(settings)
    try:
        for wave in range(1, 7):
            traffic(jm, f"http://127.0.0.1:{services['api']}", token)
            wait_until(
                lambda: query(
                    prometheus, 'sum(tasklab_jobs_finished_total{job="tasklab-workers"})'
                ),
                partial(at_least, wave * JOBS_A_WAVE),
                timeout_s=WAIT_S,
                what=f"wave {wave}'s jobs scraped",
            )
            if wave >= 2 and unfilled() <= QUIET_PANELS:
                break
    finally:
        jm.close()
    # One message a job: the backlog alert counts broker messages, and bundles carry up to
    # bundle_max jobs each.
    # A slow publish on a busy machine must not open the breaker and run the flood locally:
    # no local workers (a refused publish waits in SQL for the reaper), a patient publish.
    flooder = JobManager(
        settings.model_copy(update={"bundle_max": 1, "local_workers": 0, "publish_timeout_s": 5})
    )
    try:
        for _ in range(FLOOD):
            flooder.submit(probe_jobs.noop, queue=FLOODED)
    finally:
        flooder.close()
    killed, killed_port = nodes[0]
    killed.kill()

    down = wait_until(
        lambda: firing(prometheus, "TasklabTargetDown"),
        bool,
        timeout_s=WAIT_S,
        what="TasklabTargetDown firing",
    )
    wait_until(
        lambda: query(prometheus, f'tasklab_queue_depth{{queue="{FLOODED}"}}'),
        lambda r: bool(r) and float(r[0]["value"][1]) >= FLOOD,
        timeout_s=WAIT_S,
        what=f"the exporter's depth of {FLOODED}",
    )
    backlog = wait_until(
        lambda: firing(prometheus, "TasklabQueueBacklog"),
        bool,
        timeout_s=WAIT_S,
        what="TasklabQueueBacklog firing",
    )
    dead_letters = wait_until(
        lambda: firing(prometheus, "TasklabDeadLetters"),
        bool,
        timeout_s=WAIT_S,
        what="TasklabDeadLetters firing",
    )

    assert [(a["job"], a["instance"]) for a in down] == [
        ("tasklab-workers", f"127.0.0.1:{killed_port}")
    ]
    assert [a["queue"] for a in backlog] == [FLOODED]
    assert {(a["task"], a["queue"]) for a in dead_letters} == {(probe_jobs.fail.name, "default")}
    assert unfilled() == QUIET_PANELS
