"""Every bench dimension on embedded defaults, with tiny sizes: the JSON's shape, never speed."""

from __future__ import annotations

import uuid

import pytest
from rich.console import Console

from tasklab.lab.bench import DIMENSIONS, BenchSizes, _queue_rates, configured_brokers, run_bench
from tasklab.lab.bench_jobs import PATHS as JOB_PATHS
from tasklab.lab.bench_jobs import trial_size
from tasklab.lab.errors import LabError
from tasklab.settings import Settings
from tests.conftest import required_url
from tests.lab.helpers import printed, read_json, slo


def test_bench_runs_every_dimension_on_one_embedded_stack_and_writes_its_figures(
    lab_settings: Settings, console: Console
) -> None:
    result = run_bench(
        lab_settings,
        dimensions=DIMENSIONS,
        sizes=BenchSizes.tiny(),
        console=console,
        targets=["jobs.tasklab_throughput_per_s=1"],
    )
    data = read_json(result.path)
    figures = data["figures"]

    assert data["command"] == "bench" and data["params"]["dimensions"] == list(DIMENSIONS)
    assert data["params"]["worker"] == {
        "pool": "prefork",
        "concurrency": 2,
        "prefetch_multiplier": 4,
        "nodes": 1,
    }
    assert data["versions"]["server.redis"] and data["versions"]["server.sqlite"]
    for via in ("celery", "jobs"):
        assert figures[f"submit.{via}_submit_ms_p99"] > 0
        assert figures[f"submit.{via}_lost"] == 0
        for level in (4, 8):
            assert figures[f"concurrent.{via}_{level}_submit_per_s"] > 0
            assert figures[f"concurrent.{via}_{level}_errors"] == 0
        assert figures[f"execute.{via}_execute_per_s"] > 0
        assert figures[f"memory.{via}_redis_bytes_per_job"] >= 0  # whole-server: noisy
        assert figures[f"memory.{via}_queue_key_bytes_per_job"] > 0
    # Every dimension repeated (tiny: twice), in a shuffled order: medians with their spread.
    assert data["params"]["repeat"] == BenchSizes.tiny().repeat
    low, mid, high = (figures[f"submit.jobs_submit_ms_p99{s}"] for s in ("_min", "", "_max"))
    assert low <= mid <= high
    assert {r["path"] for r in data["tables"]["overhead"]} == {"asyncio", "celery", "jobs"}
    assert "overhead.jobs_overhead_pct" in figures and "overhead.celery_overhead_pct" in figures
    assert figures["memory.worker_rss_mb"] > 0
    assert figures["queue.redis_enqueue_per_s"] > 0 and figures["queue.redis_dequeue_per_s"] > 0

    # Raw Celery, tasklab with bundles of one and tasklab bundled, each round in its own
    # shuffled order; every figure a median with its spread.
    rows = data["tables"]["jobs"]
    assert len(rows) == 3 * BenchSizes.tiny().repeat
    # tiny sizes: no pilot, every trial its fixed size
    assert data["params"]["jobs_tasks_per_trial"] == dict.fromkeys(
        JOB_PATHS, BenchSizes.tiny().jobs_n
    )
    for round_no in (1, 2):
        assert sorted(r["path"] for r in rows if r["round"] == round_no) == sorted(JOB_PATHS)
    for path in JOB_PATHS:
        assert figures[f"jobs.{path}_lost"] == 0
        assert figures[f"jobs.{path}_succeeded"] == BenchSizes.tiny().jobs_n
        assert figures[f"jobs.{path}_drain_per_s"] > 0 and figures[f"jobs.{path}_window_s"] > 0
        low, mid, high = (figures[f"jobs.{path}_throughput_per_s{s}"] for s in ("_min", "", "_max"))
        assert 0 < low <= mid <= high
        for p in ("p50", "p99"):
            assert figures[f"jobs.{path}_e2e_ms_{p}"] > 0
    for ratio in ("throughput_ratio", "throughput_ratio_b1", "drain_ratio", "drain_ratio_b1"):
        assert (
            figures[f"jobs.{ratio}_min"] <= figures[f"jobs.{ratio}"] <= figures[f"jobs.{ratio}_max"]
        )
    assert {r["path"] for r in data["tables"]["jobs.includes"]} == set(JOB_PATHS)
    assert any(n.startswith("jobs.celery: apply_async, no task-sent event") for n in data["notes"])
    assert {
        s["label"] for s in data["series"] if s["chart"] == "bench jobs: end-to-end latency"
    } == set(JOB_PATHS)
    assert slo(data, "jobs.tasklab_throughput_per_s") == {
        "figure": "jobs.tasklab_throughput_per_s",
        "value": figures["jobs.tasklab_throughput_per_s"],
        "target": 1.0,
        "op": ">=",
        "pass": True,
    }
    assert {s["figure"] for s in data["slos"]} >= {
        "jobs.throughput_ratio",
        "jobs.tasklab_submit_ms_p99",
    }
    # Issue 5's cache benchmark, folded into the same envelope with its targets.
    assert 0 < figures["cache.overall_hit_rate"] <= 1
    assert figures["cache.l1_hit_us_p50"] > 0 and figures["cache.tiered_per_s"] > 0
    assert {"cache.overall_hit_rate", "cache.l1_hit_us_p99"} <= {s["figure"] for s in data["slos"]}
    assert "jobs.throughput_ratio" in printed(console)


def test_an_unknown_dimension_is_refused_before_anything_starts(
    lab_settings: Settings, console: Console
) -> None:
    with pytest.raises(LabError, match="unknown bench dimension"):
        run_bench(lab_settings, dimensions=["submit", "warp"], console=console)
    assert not lab_settings.results_dir.exists()


def test_rabbitmq_joins_the_queue_dimension_when_a_url_is_configured() -> None:
    settings = Settings(broker_url="amqp://guest:guest@mq:5672//")
    assert configured_brokers(settings, {"TEST_RABBITMQ_URL": "amqp://x@y//"}) == [
        "amqp://x@y//",
        "amqp://guest:guest@mq:5672//",
    ]
    assert configured_brokers(Settings(), {}) == []


@pytest.mark.rabbitmq
def test_the_queue_dimension_measures_rabbitmq_when_it_is_configured() -> None:
    url = required_url("TEST_RABBITMQ_URL")
    rates = _queue_rates(url, 50, f"lab-queue-test-{uuid.uuid4().hex[:6]}", lambda _: None)
    assert rates["enqueue_per_s"] > 0 and rates["dequeue_per_s"] > 0


def test_the_l2_cache_target_is_judged_on_the_paired_redis_get_not_the_tight_loop() -> None:
    from tasklab.lab.bench import cache_figures

    out = {
        "hit_rate": {"l1": 0.8, "l2": 0.15, "overall": 0.95, "miss": 0.05},
        "latency_us": {"l2_hit_p50": 120.0, "redis_get_p50": 40.0, "l2_round_trip_p50": 100.0},
        "throughput_per_s": {"tiered": 1.0},
        "speedup": {"vs_no_cache": 2.0},
        "targets": {"l2_hit_p50_vs_its_redis_get_p50": {"measured": 1.2, "pass": True}},
        "reference_ratios": {"l2_hit_p50_vs_tight_loop_get_p50": 3.0},
    }
    figures = cache_figures(out)
    assert figures["l2_vs_redis_get_p50_ratio"] == 1.2  # 120 / 100, not 120 / 40
    assert figures["l2_vs_tight_loop_get_p50_ratio"] == 3.0


@pytest.mark.parametrize(
    "rate, at_least, window_s, expected",
    [
        (2000.0, 10_000, 12.0, 24_000),  # a 5 s window at 10,000: sized up to 12 s
        (500.0, 10_000, 12.0, 10_000),  # 20 s already: never fewer than asked
        (1e6, 10_000, 12.0, 200_000),  # capped
        (0.0, 10_000, 12.0, 10_000),  # the pilot saw nothing finish
        (2000.0, 10_000, 0.0, 10_000),  # sizing off
    ],
)
def test_a_pilots_rate_sizes_each_live_trial_to_the_window_asked_for(
    rate: float, at_least: int, window_s: float, expected: int
) -> None:
    assert trial_size(rate, at_least=at_least, window_s=window_s) == expected
