"""The SLO objectives in tasklab.observe.slo are the ones the shipped rules and docs use."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tasklab.observe.slo import BURN_WINDOWS, JOB_SUCCESS, QUEUE_WAIT, QUEUE_WAIT_THRESHOLD_S
from tests.observe.conftest import ALERTS_DOC, PROMETHEUS_DIR
from tests.observe.test_assets import promtool, read


def rules(name: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(read(PROMETHEUS_DIR / name))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def burn_alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules("alerts.yml") if "BudgetBurn" in r.get("alert", "")}


def test_promtool_accepts_the_recording_rules() -> None:
    done = promtool("check", "rules", "rules.yml")

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules('rules.yml'))} rules found" in done.stdout


def test_the_shipped_config_loads_the_recording_rules_before_the_alerts() -> None:
    config = yaml.safe_load(read(PROMETHEUS_DIR / "prometheus.yml"))
    tests = yaml.safe_load(read(PROMETHEUS_DIR / "alerts_test.yml"))

    assert config["rule_files"] == ["rules.yml", "alerts.yml"]
    assert tests["rule_files"] == ["rules.yml", "alerts.yml"]


def test_each_slo_has_a_fast_and_a_slow_burn_alert_on_both_windows_with_its_budget() -> None:
    alerts = burn_alerts()
    recorded = {r["record"] for r in rules("rules.yml") if "record" in r}
    for slo, ratio, objective in (
        ("JobSuccess", "slo_job_failure", JOB_SUCCESS),
        ("QueueWait", "slo_queue_wait_slow", QUEUE_WAIT),
    ):
        for window in BURN_WINDOWS:
            rule = alerts.pop(f"Tasklab{slo}BudgetBurn{window.alert_suffix}")
            threshold = f"({window.factor:g} * {objective.budget:g})"
            for span in (window.long, window.short):
                series = f"tasklab:{ratio}:ratio_rate{span}"
                assert series in recorded
                assert f"{series} > {threshold}" in rule["expr"]
            assert rule["labels"] == {"severity": window.severity, "slo": objective.name}

    assert alerts == {}, "a burn-rate alert that slo.py does not describe"


def test_the_queue_wait_ratio_counts_attempts_over_the_threshold_bucket() -> None:
    exprs = [r["expr"] for r in rules("rules.yml") if "slo_queue_wait" in r.get("record", "")]

    assert exprs
    for expr in exprs:
        assert f'tasklab_job_queue_wait_seconds_bucket{{le="{QUEUE_WAIT_THRESHOLD_S}"}}' in expr


def test_the_runbook_states_each_objective_and_its_windows() -> None:
    doc = read(ALERTS_DOC)

    assert f"{JOB_SUCCESS.target:.0%} of finished jobs succeed" in doc
    assert (
        f"{QUEUE_WAIT.target:.0%} of job attempts start within {QUEUE_WAIT_THRESHOLD_S:g} s" in doc
    )
    for window in BURN_WINDOWS:
        assert re.search(rf"{window.factor:g}x .*{window.long}.*{window.short}", doc), window
