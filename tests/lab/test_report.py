"""The HTML report: built from result files, rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from tasklab.lab.report import compare_figures, direction, latest_results, run_report
from tasklab.lab.results import LabResult, Series, Target, finish
from tasklab.settings import Settings
from tests.lab.helpers import printed

CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    assert found, "chromium is missing: `make test` installs it (scripts/test_prereqs.sh)"
    return found


def dump_dom(page: Path) -> str:
    """The DOM after Chromium loaded the page and ran its scripts."""
    proc = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-extensions",
            "--no-first-run",
            f"--user-data-dir={page.parent / 'chromium-profile'}",
            "--virtual-time-budget=2000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def stress_result(throughput: float, p95_ms: float) -> LabResult:
    result = LabResult(
        "stress",
        figures={
            "fast.throughput_per_s": throughput,
            "fast.e2e_ms_p95": p95_ms,
            "fast.submitted": 100.0,
        },
    )
    cdf = [(float(v), (i + 1) / 50) for i, v in enumerate(range(1, 51))]
    result.series += [
        Series("stress: end-to-end latency", "fast", "cdf", "e2e ms", "fraction", cdf),
        Series(
            "stress: completions per second",
            "fast",
            "line",
            "seconds",
            "tasks/s",
            [(0.5, 80.0), (1.0, 120.0), (1.5, 100.0)],
        ),
        Series("stress: worker RSS", "fast", "line", "seconds", "MB", [(0, 270.0), (1, 272.0)]),
        Series("stress: queue depth", "fast", "line", "seconds", "messages", [(0, 90), (1, 3)]),
    ]
    result.tables["ledger.failures"] = [
        {
            "submitted": 10,
            "succeeded": 8,
            "dead": 2,
            "cancelled": 0,
            "lost": 0,
            "duplicate_effects": 0,
            "balanced": True,
        }
    ]
    return result


def tune_result() -> LabResult:
    result = LabResult("tune", figures={"tune.best_throughput_per_s": 410.0})
    result.tables["trials"] = [
        {
            "pool": pool,
            "concurrency": c,
            "prefetch_multiplier": p,
            "nodes": 1,
            "status": "measured",
            "throughput_per_s": 100.0 * c + p,
            "queue_wait_ms_p95": 10.0 * p,
            "meets_slo": p == 1,
        }
        for pool in ("prefork", "threads")
        for c in (2, 4)
        for p in (1, 4)
    ]
    result.tables["recommendation"] = [
        {
            "pool": "threads",
            "concurrency": 4,
            "prefetch_multiplier": 1,
            "nodes": 1,
            "meets_slo": True,
            "reasons": ["fastest <b>"],
        }
    ]
    return result


def write(result: LabResult, settings: Settings, console: Console) -> Path:
    targets = (
        Target("fast.throughput_per_s", ">", 100.0),
        Target("tune.best_throughput_per_s", ">=", 1.0),
    )
    finish(result, settings, targets=targets, console=console)
    assert result.path is not None
    return result.path


def test_the_report_shows_its_charts_and_tables_in_chromium_without_script_errors(
    tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab")
    old = write(stress_result(200.0, 40.0), settings, console)
    new = write(stress_result(150.0, 80.0), settings, console)
    tuned = write(tune_result(), settings, console)

    page = run_report(settings, paths=[new, tuned], compare=old, console=console)
    assert page == settings.home_dir / "report" / "index.html"
    html = page.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<b>" not in html  # self-contained, values escaped

    dom = dump_dom(page)
    assert re.search(r'<body[^>]*data-ready="1"', dom), "the page's script did not finish"
    assert not re.search(r"<html[^>]*data-script-errors", dom)
    assert re.search(r'<div id="script-errors"></div>', dom)
    charts = dom.count('<svg class="chart')
    assert charts == 5 and f'id="chart-count">{charts}<' in dom  # 4 stress + 1 heatmap
    assert dom.count('class="series"') >= 4 and dom.count('class="cell"') == 8
    assert "★ 401" in dom  # the recommended configuration's cell
    assert '<table class="slo sortable">' in dom and "ledger.failures" in dom
    # Throughput down 25 %, P95 up 100 %: among the moved figures, and again in the full list.
    assert dom.count('<tr class="regression">') == 4
    assert "2 regression(s) beyond 10 %" in dom
    out = printed(console)
    assert "fast.throughput_per_s" in out and "-25.0 %" in out


def test_by_default_the_report_takes_the_newest_result_of_each_command(
    tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path)
    write(stress_result(1.0, 1.0), settings, console)
    newest = write(stress_result(2.0, 1.0), settings, console)
    tuned = write(tune_result(), settings, console)
    assert sorted(latest_results(settings.results_dir)) == sorted([newest, tuned])


@pytest.mark.parametrize(
    ("figure", "way"),
    [
        ("jobs.tasklab_throughput_per_s", 1),
        ("fast.e2e_ms_p95", -1),
        ("memory.worker_rss_mb", -1),
        ("failures.ledger_lost", -1),
        ("fast.success_pct", 1),
        ("fast.submitted", None),
        ("jobs.e2e_p50_ratio", -1),
        ("jobs.throughput_ratio", 1),
        ("cache.l1_hit_us_p99", -1),
        ("cache.overall_hit_rate", 1),
        ("cache.speedup_vs_no_cache", 1),
        ("cache.miss_rate", -1),
    ],
)
def test_each_figure_knows_which_way_is_better(figure: str, way: int | None) -> None:
    assert direction(figure) == way


def test_a_change_within_the_tolerance_is_not_a_regression() -> None:
    changes = compare_figures(
        {"a.e2e_ms_p95": 100.0, "a.x_per_s": 100.0},
        {"a.e2e_ms_p95": 109.0, "a.x_per_s": 80.0},
        tolerance_pct=10,
    )
    assert {c.figure: c.regression for c in changes} == {"a.e2e_ms_p95": False, "a.x_per_s": True}


def test_a_change_within_the_spread_of_repeated_trials_is_not_a_regression() -> None:
    old = {"jobs.x_per_s": 100.0, "jobs.x_per_s_min": 80.0, "jobs.x_per_s_max": 120.0}
    overlapping = {"jobs.x_per_s": 85.0, "jobs.x_per_s_min": 70.0, "jobs.x_per_s_max": 95.0}
    beyond = {"jobs.x_per_s": 60.0, "jobs.x_per_s_min": 55.0, "jobs.x_per_s_max": 70.0}
    single = {"jobs.x_per_s": 85.0}
    verdict = {
        name: next(c.regression for c in compare_figures(old, new) if c.figure == "jobs.x_per_s")
        for name, new in (("overlapping", overlapping), ("beyond", beyond), ("single", single))
    }
    assert verdict == {"overlapping": False, "beyond": True, "single": True}
    slower = {"e.lat_ms": 10.0, "e.lat_ms_min": 9.0, "e.lat_ms_max": 11.0}
    much_slower = {"e.lat_ms": 14.0, "e.lat_ms_min": 12.0, "e.lat_ms_max": 16.0}
    assert [
        c.regression for c in compare_figures(slower, much_slower) if c.figure == "e.lat_ms"
    ] == [True]


def test_the_report_draws_the_spread_of_repeated_trials(tmp_path: Path, console: Console) -> None:
    settings = Settings(home_dir=tmp_path / "home")
    figures = {"jobs.x_per_s": 90.0, "jobs.x_per_s_min": 80.0, "jobs.x_per_s_max": 120.0}
    result = finish(LabResult("bench", figures=figures), settings, targets=[], console=console)
    html = run_report(settings, paths=[result.path] if result.path else [], console=console)
    page = html.read_text()
    assert "repeated trials: median (dot) and spread (min to max)" in page
    assert "jobs.x_per_s: median 90 (min 80, max 120)" in page
