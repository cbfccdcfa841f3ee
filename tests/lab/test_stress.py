"""Every stress scenario on embedded defaults with tiny sizes: outcomes, ledger and JSON shape."""

from __future__ import annotations

import psutil
from rich.console import Console

from tasklab.lab.report import run_report
from tasklab.lab.results import LabResult, resolve_targets
from tasklab.lab.stress import DEFAULT_TARGETS, SCENARIOS, StressSizes, flag_leak, run_stress
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json, slo


def test_stress_runs_every_scenario_as_durable_jobs_proves_the_ledger_and_cleans_up(
    lab_settings: Settings, console: Console
) -> None:
    sizes = StressSizes.tiny()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = run_stress(
        lab_settings,
        scenarios=SCENARIOS,
        sizes=sizes,
        console=console,
        targets=["fast.throughput_per_s=0.5", "e2e_ms_p99<60000"],
    )
    data = read_json(result.path)
    f = data["figures"]

    assert data["params"]["via"] == "jobs"
    assert f["fast.succeeded"] == sizes.fast_n and f["fast.success_pct"] == 100
    for name in (
        "throughput_per_s",
        "queue_wait_ms_p95",
        "run_ms_p95",
        "e2e_ms_p99",
        "submit_ms_p95",
        "worker_cpu_pct",
        "rss_end_mb",
    ):
        assert f"fast.{name}" in f, name
    assert f["long.succeeded"] == sizes.long_n and f["long.redelivered"] == 0
    assert f["long.run_ms_p50"] >= sizes.long_s * 1000 * 0.9
    assert 0 <= f["priority.inversion_pct"] <= 100
    assert "priority.high_queue_wait_ms_p50" in f and "priority.low_queue_wait_ms_p50" in f

    # Failures: the flaky half retried and succeeded, the fatal half is dead, nothing lost.
    fatal = (
        round(sizes.failures_n * sizes.failures_share)
        - round(sizes.failures_n * sizes.failures_share) // 2
    )
    assert f["failures.outcome_match_pct"] == 100
    assert f["failures.ledger_dead"] == fatal
    assert f["failures.ledger_retried"] >= sizes.failures_n * sizes.failures_share
    assert f["failures.ledger_lost"] == 0 and f["failures.ledger_duplicate_effects"] == 0
    assert f["failures.ledger_effects"] == f["failures.ledger_succeeded"]
    assert data["tables"]["ledger.failures"][0]["balanced"] is True

    assert f["leak.succeeded"] == sizes.leak_n and "leak.rss_slope_mb_per_1000" in f
    leak = next(s for s in data["series"] if s["chart"].startswith("stress leak"))
    assert leak["points"][-1][0] == sizes.leak_n

    assert slo(data, "fast.throughput_per_s")["target"] == 0.5
    assert slo(data, "fast.throughput_per_s")["op"] == ">"
    assert {s["figure"] for s in data["slos"] if s["figure"].endswith("e2e_ms_p99")} == {
        f"{s}.e2e_ms_p99" for s in SCENARIOS if f"{s}.e2e_ms_p99" in f
    }
    assert all(s["pass"] for s in data["slos"]), data["slos"]
    assert "failures.ledger_lost" in printed(console)

    children = psutil.Process().children(recursive=True)
    alive = {p.pid for p in children if p.status() != psutil.STATUS_ZOMBIE}
    assert alive <= children_before, "a worker or Redis outlived the run"

    report = run_report(lab_settings, console=console)
    html = report.read_text()
    assert html.count('<svg class="chart"') >= 5 and "failures.ledger_lost" in html


def test_the_leak_flag_follows_the_rss_growth_target_in_force() -> None:
    result = LabResult("stress", figures={"leak.rss_growth_mb": 20.0, "leak.leak_flagged": 0.0})
    flag_leak(result, resolve_targets(DEFAULT_TARGETS, []))
    assert result.figures["leak.leak_flagged"] == 0.0
    flag_leak(result, resolve_targets(DEFAULT_TARGETS, ["rss_growth_mb=10"]))
    assert result.figures["leak.leak_flagged"] == 1.0
    assert result.params["leak_threshold_mb"] == 10.0
