from __future__ import annotations

import itertools

import pytest

from tasklab.lab.summary import (
    cdf_points,
    completions_over_time,
    linear_fit,
    priority_inversions,
    summarize,
    throughput_per_s,
)
from tasklab.lab.workload import Sample


def sample(
    i: int, *, sent: float, start: float, end: float, prio: int = 5, status: str = "succeeded"
) -> Sample:
    return Sample(str(i), status, sent, start, end, prio)


def test_throughput_counts_succeeded_tasks_from_first_submit_to_last_finish() -> None:
    samples = [sample(i, sent=100.0 + i * 0.1, start=100.5, end=101.0 + i * 0.25) for i in range(4)]
    samples.append(sample(9, sent=100.2, start=100.3, end=100.4, status="failed"))
    assert throughput_per_s(samples) == pytest.approx(4 / 1.75)


def test_summary_splits_queue_wait_run_time_and_end_to_end_latency() -> None:
    figures = summarize([sample(1, sent=10.0, start=10.010, end=10.030)])
    assert figures["queue_wait_ms_p50"] == pytest.approx(10.0)
    assert figures["run_ms_p50"] == pytest.approx(20.0)
    assert figures["e2e_ms_p50"] == pytest.approx(30.0)
    assert figures["success_pct"] == 100.0 and figures["submitted"] == 1


def test_a_start_that_jumps_a_waiting_higher_priority_task_is_an_inversion() -> None:
    samples = [
        sample(1, sent=0.0, start=0.1, end=0.2, prio=1),  # nobody was waiting yet
        sample(2, sent=0.15, start=0.3, end=0.4, prio=2),  # 3 (prio 9) waited since 0.2
        sample(3, sent=0.2, start=0.5, end=0.6, prio=9),
    ]
    assert priority_inversions(samples) == (1, 3)


def test_a_cdf_is_thinned_but_keeps_its_last_point() -> None:
    points = cdf_points([float(v) for v in range(1000)], max_points=100)
    assert len(points) <= 101
    assert points[-1] == (999.0, 1.0)
    assert all(a[1] < b[1] for a, b in itertools.pairwise(points))


def test_completions_are_bucketed_per_second_of_the_run() -> None:
    samples = [sample(i, sent=0.0, start=0.0, end=t) for i, t in enumerate((0.1, 0.2, 1.5))]
    assert completions_over_time(samples, bucket_s=1.0) == [(1.0, 2.0), (2.0, 1.0)]


def test_a_linear_fit_recovers_the_slope() -> None:
    slope, intercept = linear_fit([0, 1000, 2000, 3000], [100, 102, 104, 106])
    assert slope == pytest.approx(0.002) and intercept == pytest.approx(100)
