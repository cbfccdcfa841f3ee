from __future__ import annotations

import json
from collections import Counter

from tasklab.lab.bench_cache import run_cache_bench, zipf_sequence
from tasklab.settings import Settings


def test_zipf_reads_favour_low_ranks_and_stay_in_range() -> None:
    seq = zipf_sequence(100, 1.1, 5000, seed=3)
    counts = Counter(seq)
    assert min(seq) >= 0 and max(seq) < 100
    assert counts[0] > counts[1] > counts[10] > counts[50]
    assert seq == zipf_sequence(100, 1.1, 5000, seed=3)  # reproducible


def test_a_tiny_cache_bench_reports_every_figure_and_sane_hit_rates(settings: Settings) -> None:
    result = run_cache_bench(
        settings,
        keys=200,
        l1_entries=50,
        reads=2000,
        warmup_reads=2000,
        loader_cost_s=0.0,
        baseline_reads=50,
        redis_get_samples=200,
    )
    json.dumps(result)  # JSON-able
    rates = result["hit_rate"]
    assert abs(rates["l1"] + rates["l2"] + rates["miss"] - 1) < 1e-9
    assert rates["l1"] > 0.3 and rates["l2"] > 0 and rates["overall"] > 0.8
    assert rates["redis_only"] > 0.8
    for name in ("l1_hit", "l2_hit", "l2_round_trip", "redis_get", "redis_only_hit"):
        assert result["latency_us"][f"{name}_p50"] > 0
        assert result["latency_us"][f"{name}_p99"] >= result["latency_us"][f"{name}_p50"]
    assert set(result["throughput_per_s"]) == {"tiered", "redis_only", "no_cache"}
    assert set(result["targets"]) == {
        "overall_hit_rate",
        "l1_hit_p99_us",
        "l2_hit_p50_vs_its_redis_get_p50",
    }
    assert result["samples"]["l2"] > 0
    assert set(result["reference_ratios"]) == {
        "l2_hit_p50_vs_tight_loop_get_p50",
        "redis_only_hit_p50_vs_tight_loop_get_p50",
    }
    assert all(isinstance(t["pass"], bool) for t in result["targets"].values())
    assert result["passed"] == all(t["pass"] for t in result["targets"].values())
    assert result["config"]["keys"] == 200
