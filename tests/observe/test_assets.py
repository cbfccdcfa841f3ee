"""The deploy/ assets are checked by promtool and only use metrics the code registers."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from tasklab.observe import metrics
from tests.observe.conftest import ALERTS_DOC, DASHBOARD, PROMETHEUS_DIR, require_binary

METRIC_NAME = re.compile(r"\b((?:tasklab|process|python)_[a-zA-Z0-9_]+)")
# Series recorded by rules.yml (level:metric:operations): their own expressions name the metrics.
RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-zA-Z0-9_]+:[a-zA-Z0-9_]+")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(read(PROMETHEUS_DIR / "alerts.yml"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def registered_names() -> set[str]:
    """Sample names tasklab's metrics expose, suffixes included, plus the default collectors'."""
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    # Families collectors build at scrape time (the worker node's process tree) by name.
    names |= {v for k, v in vars(metrics).items() if k.endswith("_NAME") and isinstance(v, str)}
    for family in REGISTRY.collect():
        if family.name.startswith(("process_", "python_")):
            names |= {s.name for s in family.samples}
    return names


def dashboard_exprs() -> Iterator[str]:
    for panel in json.loads(read(DASHBOARD))["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def test_promtool_accepts_the_prometheus_config() -> None:
    done = promtool("check", "config", "prometheus.yml")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    done = promtool("check", "rules", "alerts.yml")

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    done = promtool("test", "rules", "alerts_test.yml")

    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    tests = yaml.safe_load(read(PROMETHEUS_DIR / "alerts_test.yml"))["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    names = {rule["alert"] for rule in alert_rules()}

    assert names - fires == set(), "alerts without a firing test"
    assert names - silent == set(), "alerts without a healthy (silent) test"


def test_the_required_alerts_exist_with_their_severities() -> None:
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}
    critical = {
        "TasklabWorkerDown",
        "TasklabBeatDown",
        "TasklabWorkerMemoryLeak",
        "TasklabSystemResourcesExhausted",
        "TasklabDiskSpaceLow",
    }
    warning = {
        "TasklabQueueBacklog",
        "TasklabHighFailureRate",
        "TasklabSlowTasks",
        "TasklabHighCpu",
        "TasklabHighMemory",
        "TasklabScheduleDelay",
        "TasklabDeadLetters",
        "TasklabTooFewWorkers",
        "TasklabThroughputDrop",
        "TasklabExcessiveRetries",
        "TasklabRedisConnectionErrors",
        "TasklabUnackedGrowing",
        "TasklabRecoveriesHappening",
        "TasklabOldestJobTooOld",
    }

    assert {a: severities.get(a) for a in critical} == dict.fromkeys(critical, "critical")
    assert {a: severities.get(a) for a in warning} == dict.fromkeys(warning, "warning")
    assert "TasklabFallbackModeActive" in severities


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    headings = {
        line[3:].strip().lower() for line in read(ALERTS_DOC).splitlines() if line.startswith("## ")
    }
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook_url"] == f"docs/alerts.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in headings, f"no runbook section for {rule['alert']}"


@pytest.mark.parametrize("source", ["alerts.yml", "alerts_test.yml", "rules.yml", "tasklab.json"])
def test_every_metric_name_in_the_assets_is_registered_by_the_code(source: str) -> None:
    if source == "tasklab.json":
        text = "\n".join(dashboard_exprs())
    else:
        text = read(PROMETHEUS_DIR / source)
    used = set(METRIC_NAME.findall(RECORDED_NAME.sub("", text)))

    assert used, "no metric names found: the pattern is wrong"
    assert used - registered_names() == set()


def test_the_dashboard_covers_what_operators_look_at() -> None:
    exprs = "\n".join(dashboard_exprs())
    titles = " ".join(p["title"] for p in json.loads(read(DASHBOARD))["panels"]).lower()

    for metric in (
        "tasklab_jobs_finished_total",
        "tasklab_job_duration_seconds_bucket",
        "tasklab_queue_depth",
        "tasklab_queue_oldest_job_age_seconds",
        "tasklab_workers_up",
        "tasklab_fallback_active",
        "tasklab_cache_hits_total",
        "tasklab_http_requests_total",
        "tasklab_http_request_duration_seconds_bucket",
        "tasklab_sql_slow_queries_total",
    ):
        assert metric in exprs
    for word in ("throughput", "p50 / p95 / p99", "failure rate", "hit rate by level"):
        assert word in titles


def test_the_dashboard_filters_its_panels_by_queue_task_and_instance() -> None:
    dashboard = json.loads(read(DASHBOARD))
    variables = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "query"}
    exprs = list(dashboard_exprs())

    assert set(variables) == {"queue", "task", "instance"}
    for name, variable in variables.items():
        assert variable["includeAll"] and variable["allValue"] == ".*"
        assert METRIC_NAME.findall(variable["query"]["query"]) or "up{" in variable["definition"]
        assert any(f'=~"${name}"' in expr for expr in exprs), f"no panel uses ${name}"
    for expr in exprs:
        for selector in re.findall(r"tasklab_job[a-z_]*_(?:total|bucket)\{[^}]*\}", expr):
            if "recoveries" not in selector:
                assert all(f'=~"${v}"' in selector for v in variables), selector
