from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from tasklab.lab.errors import TargetError
from tasklab.lab.results import (
    SCHEMA,
    LabResult,
    Series,
    Target,
    evaluate,
    finish,
    parse_target,
    resolve_targets,
)
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json

DEFAULTS = (
    Target("fast.throughput_per_s", ">", 100.0),
    Target("fast.submit_ms_p95", "<", 100.0),
    Target("long.success_pct", ">", 95.0),
)


def test_a_target_with_equals_keeps_the_comparison_of_the_default_it_overrides() -> None:
    assert parse_target("fast.throughput_per_s=250", DEFAULTS) == Target(
        "fast.throughput_per_s", ">", 250.0
    )
    assert parse_target("submit_ms_p95=20", DEFAULTS).op == "<"


def test_a_target_states_its_own_comparison_when_given_one() -> None:
    assert parse_target("throughput_per_s<=5", DEFAULTS) == Target("throughput_per_s", "<=", 5.0)


def test_a_target_without_a_default_infers_its_comparison_from_the_figure_name() -> None:
    assert parse_target("e2e_ms_p99=50").op == "<="
    assert parse_target("queue.redis_enqueue_per_s=1000").op == ">="
    assert parse_target("leak.rss_growth_mb=10").op == "<="


@pytest.mark.parametrize("spec", ["throughput", "=5", "x=fast", "a b=1"])
def test_a_malformed_target_is_refused_with_an_example(spec: str) -> None:
    with pytest.raises(TargetError, match="NAME=VALUE"):
        parse_target(spec)


def test_an_unqualified_override_replaces_every_default_of_that_figure() -> None:
    targets = resolve_targets(
        (*DEFAULTS, Target("long.throughput_per_s", ">", 1.0)), ["throughput_per_s=7"]
    )
    assert [t for t in targets if "throughput" in t.figure] == [
        Target("throughput_per_s", ">", 7.0)
    ]
    checks = evaluate({"fast.throughput_per_s": 8.0, "long.throughput_per_s": 6.0}, targets)
    verdicts = {c.figure: c.passed for c in checks if "throughput" in c.figure}
    assert verdicts == {"fast.throughput_per_s": True, "long.throughput_per_s": False}


def test_a_target_whose_figure_was_not_measured_fails_within_what_the_run_set_out_to_do() -> None:
    targets = resolve_targets(DEFAULTS, ["ghost_ms=1"])
    checks = evaluate({"fast.throughput_per_s": 150.0}, targets, scope=["fast"])
    assert [(c.figure, c.value, c.passed) for c in checks] == [
        ("fast.throughput_per_s", 150.0, True),
        ("fast.submit_ms_p95", None, False),
        ("ghost_ms", None, False),
    ]
    everything = evaluate({"fast.throughput_per_s": 150.0}, targets)
    assert ("long.success_pct", False) in [(c.figure, c.passed) for c in everything]


def test_the_envelope_has_machine_versions_masked_settings_figures_and_slos(
    tmp_path: Path, console: Console
) -> None:
    settings = Settings(
        home_dir=tmp_path / "home",
        redis_url="redis://:s3cret@db.example:6379/0",
        database_url="postgresql://app:hunter2@pg.example/app",
    )
    result = LabResult(
        "stress",
        params={"scenarios": ["fast"]},
        figures={"fast.throughput_per_s": 123.4, "fast.lost": 0.0},
    )
    result.series.append(Series("chart", "fast", "cdf", "ms", "fraction", [(1.0, 0.5), (2.0, 1.0)]))
    finish(result, settings, targets=DEFAULTS[:1], console=console)

    assert result.path is not None and result.path.parent == settings.results_dir
    assert result.path.name.startswith("stress-") and result.path.suffix == ".json"
    data = read_json(result.path)
    assert data["schema"] == SCHEMA and data["command"] == "stress"
    assert {"cores", "memory_gb", "cpu_model", "os", "python", "load_avg_at_start"} <= set(
        data["machine"]
    )
    assert {"tasklab", "celery", "kombu", "redis", "SQLAlchemy"} <= set(data["versions"])
    assert data["settings"]["redis_url"] == "redis://:***@db.example:6379/0"
    assert "hunter2" not in result.path.read_text() and "s3cret" not in result.path.read_text()
    assert data["slos"] == [
        {
            "figure": "fast.throughput_per_s",
            "value": 123.4,
            "target": 100.0,
            "op": ">",
            "pass": True,
        }
    ]
    assert data["series"][0]["points"] == [[1.0, 0.5], [2.0, 1.0]]
    out = printed(console)
    assert "fast.throughput_per_s" in out and "pass" in out and str(result.path) in out


def test_two_results_written_in_the_same_second_do_not_overwrite_each_other(
    tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path)
    first = LabResult("bench", started_at=1_700_000_000.0)
    second = LabResult("bench", started_at=1_700_000_000.0)
    finish(first, settings, targets=(), console=console)
    finish(second, settings, targets=(), console=console)
    assert first.path != second.path and first.path and second.path
    assert first.path.is_file() and second.path.is_file()


def test_the_results_table_marks_a_failed_target(tmp_path: Path, console: Console) -> None:
    result = LabResult("stress", figures={"fast.throughput_per_s": 12.0})
    finish(result, Settings(home_dir=tmp_path), targets=DEFAULTS, console=console)
    assert not result.passed
    assert "FAIL" in printed(console)
