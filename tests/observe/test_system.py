"""JSON views: system (psutil), database (sql stats), application (from a registry)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tasklab.observe.metrics import LATENCY_BUCKETS_S
from tasklab.observe.sql import QueryStats, SlowQuery
from tasklab.observe.system import (
    RateWindow,
    application_metrics,
    bucket_quantile,
    database_metrics,
    system_metrics,
)
from tasklab.settings import Settings


def test_the_system_view_reports_host_and_process_figures(tmp_path: Path) -> None:
    received_before = psutil.net_io_counters().bytes_recv
    view = system_metrics(Settings(home_dir=tmp_path / "not-created-yet"))
    received_after = psutil.net_io_counters().bytes_recv
    now = time.time()

    assert view["cpu"]["count"] >= 1
    assert 0 < view["memory"]["available_bytes"] <= view["memory"]["total_bytes"]
    assert view["disk"]["path"] == str(tmp_path.resolve())
    assert view["disk"]["total_bytes"] > 0
    # the host's counter, read between two reads of it
    assert received_before <= view["network"]["bytes_recv"] <= received_after
    # this process's age and the host's, not some other clock (rounded to 0.1 s)
    process_age_s = now - psutil.Process().create_time()
    assert process_age_s - 1 <= view["process"]["uptime_s"] <= process_age_s + 0.1
    host_age_s = now - psutil.boot_time()
    assert host_age_s - 1 <= view["uptime_s"] <= host_age_s + 0.1
    assert view["process"]["rss_bytes"] > 0


def test_the_database_view_shows_counts_and_recent_slow_queries() -> None:
    stats = QueryStats()
    stats.record(0.010)
    stats.record(
        0.300,
        SlowQuery(at=1.0, duration_ms=300.0, operation="update", statement="UPDATE t SET a = ?"),
    )

    view = database_metrics(stats)

    assert view["query_count"] == 2
    assert view["avg_ms"] == pytest.approx(155.0)
    assert view["max_ms"] == pytest.approx(300.0)
    assert view["slow_query_count"] == 1
    assert view["recent_slow_queries"][0]["statement"] == "UPDATE t SET a = ?"


def make_registry() -> tuple[CollectorRegistry, Counter]:
    """A registry with tasklab's metric names and known values, and its HTTP counter."""
    registry = CollectorRegistry()
    http = Counter("tasklab_http_requests", "", ["method", "route", "status"], registry=registry)
    http.labels("GET", "/a", "200").inc(90)
    http.labels("GET", "/a", "500").inc(10)
    duration = Histogram(
        "tasklab_http_request_duration_seconds",
        "",
        ["method", "route"],
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )
    for _ in range(100):
        duration.labels("GET", "/a").observe(0.02)
    finished = Counter("tasklab_jobs_finished", "", ["task", "queue", "status"], registry=registry)
    finished.labels("t", "default", "succeeded").inc(40)
    finished.labels("t", "default", "dead").inc(2)
    Gauge("tasklab_fallback_active", "", registry=registry).set(1)
    return registry, http


def test_the_application_view_computes_rates_over_the_window_between_calls() -> None:
    registry, http = make_registry()
    window = RateWindow()
    application_metrics(registry, window=window, now=1000.0)
    http.labels("GET", "/a", "200").inc(50)

    view = application_metrics(registry, window=window, now=1010.0)

    assert view["rate_basis"] == "window"
    assert view["http"]["requests_total"] == 150
    assert view["http"]["requests_per_s"] == pytest.approx(5.0)
    assert view["http"]["errors_5xx_per_s"] == 0
    assert view["jobs"]["finished_by_status"] == {"succeeded": 40, "dead": 2}
    assert view["jobs"]["fallback_active"] is True


def test_the_application_view_estimates_latency_quantiles_from_buckets() -> None:
    registry, _ = make_registry()
    view = application_metrics(registry, window=RateWindow(), now=1000.0)

    latency = view["http"]["latency_ms"]
    assert latency["mean"] == pytest.approx(20.0)
    assert 10.0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= 25.0
    assert view["rate_basis"] == "since_start"
    assert view["jobs"]["duration_ms"] == {"mean": None, "p50": None, "p95": None, "p99": None}


def test_bucket_quantiles_interpolate_like_prometheus() -> None:
    buckets = [(1.0, 10.0), (2.0, 30.0), (float("inf"), 40.0)]

    assert bucket_quantile(0.5, buckets) == pytest.approx(1.5)  # rank 20: half-way in (1, 2]
    assert bucket_quantile(0.25, buckets) == pytest.approx(1.0)
    assert bucket_quantile(0.99, buckets) == 2.0  # in +Inf: the highest finite bound
    assert bucket_quantile(0.5, []) is None
