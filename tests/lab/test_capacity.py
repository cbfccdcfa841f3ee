"""``tasklab load --rate`` and ``--find-capacity``: the open loop against the lab's own
reference service for a few seconds, and the rules that judge a step. Never the speed."""

from __future__ import annotations

from dataclasses import replace

import pytest
from rich.console import Console

from tasklab.lab.capacity import OpenLoadSizes, judge, run_open_load
from tasklab.lab.errors import LabError
from tasklab.lab.openloop import Outcome, Schedule, slope
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json, slo


def _step(**changes: float) -> dict[str, float]:
    base = {
        "offered_per_s": 100.0,
        "requests": 1000.0,
        "latency_ms_p99": 40.0,
        "error_pct": 0.0,
        "backlog_growth_per_s": 0.5,
        "generator_lag_ms_p99": 3.0,
    }
    return {**base, **changes}


def test_a_step_is_sustained_only_within_the_slo_without_errors_and_with_workers_keeping_up() -> (
    None
):
    assert judge(_step(), slo_p99_ms=500, judge_backlog=True) == []
    assert "SLO" in judge(_step(latency_ms_p99=900), slo_p99_ms=500, judge_backlog=True)[0]
    assert "errors" in judge(_step(error_pct=0.2), slo_p99_ms=500, judge_backlog=True)[0]
    behind = judge(_step(backlog_growth_per_s=30.0), slo_p99_ms=500, judge_backlog=True)
    assert behind == ["workers fall behind: pending orders +30.0/s"]
    assert judge(_step(backlog_growth_per_s=30.0), slo_p99_ms=500, judge_backlog=False) == []
    assert (
        "generator" in judge(_step(generator_lag_ms_p99=80), slo_p99_ms=500, judge_backlog=True)[0]
    )
    assert judge(_step(requests=0.0), slo_p99_ms=500, judge_backlog=True)


def test_the_backlog_slope_is_taken_over_the_counted_window_only() -> None:
    outcome = Outcome(Schedule(rate_per_s=10, duration_s=4, warmup_s=1))
    outcome.backlog = [(0.0, 500.0), (0.5, 400.0), (1.0, 10.0), (2.0, 20.0), (3.0, 30.0)]
    assert outcome.backlog_growth_per_s() == pytest.approx(10.0)
    assert slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert Outcome(Schedule(rate_per_s=10, duration_s=4)).backlog_growth_per_s() is None
    assert len(Schedule(rate_per_s=20, duration_s=2, warmup_s=0.5).due_times()) == 50


def test_a_steady_open_loop_reports_latency_from_the_due_time_and_the_jobs_behind_it(
    lab_settings: Settings, console: Console
) -> None:
    result = run_open_load(lab_settings, sizes=OpenLoadSizes.tiny(), console=console)
    data = read_json(result.path)
    f = data["figures"]

    assert data["params"]["mode"] == "open loop at 20/s"
    assert f["open.requests"] == 40  # 2 counted seconds at 20/s; the warm-up's are not
    assert f["open.offered_per_s"] == 20
    assert f["open.latency_ms_p99"] >= f["open.latency_ms_p50"] > 0
    assert "open.backlog_growth_per_s" in f and f["open.keeping_up"] in (0.0, 1.0)
    assert f["open.jobs_timed"] + f["open.jobs_unfinished"] == f["open.requests"] - f["open.errors"]
    assert f["open.e2e_ms_p95"] >= f["open.queue_wait_ms_p95"] >= 0
    assert f["open.generator_cpu_pct"] > 0
    assert f["shop.orders_lost"] == 0 and f["shop.invariant_violations"] == 0
    assert slo(data, "open.queue_wait_ms_p95")["target"] == 100
    assert slo(data, "open.e2e_ms_p95")["pass"] is (f["open.e2e_ms_p95"] < 100)
    assert {s["chart"] for s in data["series"]} >= {
        "open loop: latency from the due time",
        "open loop: pending orders",
    }
    assert "latency from each request's due time" in printed(console)


def test_finding_capacity_steps_the_rate_up_and_names_the_knee(
    lab_settings: Settings, console: Console
) -> None:
    # An SLO no request can meet: the first step fails, so the knee is 0 and the search
    # stops there, saying why.
    sizes = replace(OpenLoadSizes.tiny(), slo_p99_ms=0.001)
    result = run_open_load(lab_settings, sizes=sizes, find_capacity=True, console=console)
    data = read_json(result.path)
    f = data["figures"]
    assert f["capacity.steps"] == 1 and f["capacity.knee_per_s"] == 0
    assert slo(data, "capacity.knee_per_s")["pass"] is False
    assert data["tables"]["steps"][0]["verdict"].startswith("stop: P99")
    assert any("stopped at 10/s" in n for n in data["notes"])

    result = run_open_load(
        lab_settings, sizes=OpenLoadSizes.tiny(), find_capacity=True, console=console
    )
    data = read_json(result.path)
    rows = data["tables"]["steps"]
    assert [r["offered_per_s"] for r in rows] == [10.0, 20.0][: len(rows)]
    sustained = [r["offered_per_s"] for r in rows if r["verdict"] == "sustained"]
    assert data["figures"]["capacity.knee_per_s"] == max(sustained, default=0.0)


def test_an_open_loop_on_a_running_service_needs_its_users(
    lab_settings: Settings, console: Console
) -> None:
    with pytest.raises(LabError, match="--tokens"):
        run_open_load(lab_settings, url="http://127.0.0.1:9", console=console)
    with pytest.raises(LabError, match="unknown endpoint"):
        run_open_load(lab_settings, sizes=replace(OpenLoadSizes(), endpoint="x"), console=console)
