"""Data for the JSON views (``/api/v1/metrics/{system,database,application}``), as plain dicts.

* ``system_metrics``: host CPU, memory, disk, network and uptime (psutil) plus this process.
* ``database_metrics``: this process's SQL figures from ``sql.QUERY_STATS``.
* ``application_metrics``: request and job rates and latencies read back from the Prometheus
  registry (all processes in multiprocess mode). Rates are over the window since an earlier
  call (kept up to ``RATE_WINDOW_S``); on the first call, the average since start.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Metric

from tasklab.observe import multiproc
from tasklab.observe.registry import api_registry
from tasklab.observe.sql import QUERY_STATS, QueryStats
from tasklab.settings import Settings

RATE_WINDOW_S = 300.0
MIN_RATE_SPAN_S = 1.0
QUANTILES = (0.5, 0.95, 0.99)

Labels = dict[str, str]


# --- system -------------------------------------------------------------------------------
def system_metrics(settings: Settings) -> dict[str, Any]:
    now = time.time()
    memory = psutil.virtual_memory()
    disk_path = _existing_parent(settings.home_dir)
    disk = psutil.disk_usage(str(disk_path))
    net = psutil.net_io_counters()
    process = psutil.Process()
    with process.oneshot():
        cpu = process.cpu_times()
        proc = {
            "pid": process.pid,
            "rss_bytes": process.memory_info().rss,
            "cpu_seconds": round(cpu.user + cpu.system, 3),
            "threads": process.num_threads(),
            "uptime_s": round(now - process.create_time(), 1),
        }
    return {
        # percent: host CPU busy since the previous call in this process (0.0 on the first);
        # load_avg needs no previous call.
        "cpu": {
            "percent": psutil.cpu_percent(interval=None),
            "count": psutil.cpu_count(),
            "load_avg": [round(x, 2) for x in psutil.getloadavg()],
        },
        "memory": {
            "total_bytes": memory.total,
            "available_bytes": memory.available,
            "used_bytes": memory.used,
            "percent": memory.percent,
        },
        "disk": {
            "path": str(disk_path),
            "total_bytes": disk.total,
            "free_bytes": disk.free,
            "used_bytes": disk.used,
            "percent": disk.percent,
        },
        "network": {
            "bytes_sent": net.bytes_sent,
            "bytes_recv": net.bytes_recv,
            "packets_sent": net.packets_sent,
            "packets_recv": net.packets_recv,
            "errors_in": net.errin,
            "errors_out": net.errout,
        },
        "uptime_s": round(now - psutil.boot_time(), 1),
        "process": proc,
    }


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --- database -----------------------------------------------------------------------------
def database_metrics(stats: QueryStats | None = None) -> dict[str, Any]:
    """Query count, average and max time, recent slow queries (redacted), of this process."""
    return {"scope": f"process {os.getpid()}", **(stats or QUERY_STATS).snapshot()}


# --- application --------------------------------------------------------------------------
class RateWindow:
    """Remembers recent counter totals so that a rate can be given over a real time span."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._history: deque[tuple[float, dict[str, float]]] = deque()
        self._lock = threading.Lock()

    def rates(
        self, totals: Mapping[str, float], *, now: float, started_at: float
    ) -> tuple[dict[str, float], float, str]:
        """(rate per second for each key, span in seconds, "window" or "since_start")."""
        with self._lock:
            while self._history and now - self._history[0][0] > self.window_s:
                self._history.popleft()
            base = self._history[0] if self._history else None
            self._history.append((now, dict(totals)))
        if base is not None and now - base[0] >= MIN_RATE_SPAN_S:
            span, basis, before = now - base[0], "window", base[1]
        else:
            span, basis, before = max(now - started_at, MIN_RATE_SPAN_S), "since_start", {}
        return {k: (v - before.get(k, 0.0)) / span for k, v in totals.items()}, span, basis


_DEFAULT_WINDOW = RateWindow()


def application_metrics(
    registry: CollectorRegistry | None = None,
    *,
    window: RateWindow | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """HTTP and job figures computed from the metrics registry."""
    now = time.time() if now is None else now
    samples = _samples((registry or api_registry()).collect())
    totals = {
        "http_requests": _sum(samples, "tasklab_http_requests_total"),
        "http_errors": _sum(
            samples, "tasklab_http_requests_total", lambda lb: lb.get("status", "").startswith("5")
        ),
        "jobs_submitted": _sum(samples, "tasklab_jobs_submitted_total"),
        "jobs_finished": _sum(samples, "tasklab_jobs_finished_total"),
        "jobs_dead": _sum(
            samples, "tasklab_jobs_finished_total", lambda lb: lb.get("status") == "dead"
        ),
        "job_retries": _sum(samples, "tasklab_job_retries_total"),
    }
    rates, span_s, basis = (window or _DEFAULT_WINDOW).rates(
        totals, now=now, started_at=_started_at()
    )
    return {
        "rate_basis": basis,
        "rate_span_s": round(span_s, 1),
        "http": {
            "requests_total": totals["http_requests"],
            "requests_per_s": round(rates["http_requests"], 3),
            "errors_5xx_per_s": round(rates["http_errors"], 3),
            "latency_ms": _latency_ms(samples, "tasklab_http_request_duration_seconds"),
        },
        "jobs": {
            "submitted_total": totals["jobs_submitted"],
            "submitted_per_s": round(rates["jobs_submitted"], 3),
            "finished_total": totals["jobs_finished"],
            "finished_per_s": round(rates["jobs_finished"], 3),
            "finished_by_status": _by_label(samples, "tasklab_jobs_finished_total", "status"),
            "dead_per_s": round(rates["jobs_dead"], 3),
            "retries_per_s": round(rates["job_retries"], 3),
            "duration_ms": _latency_ms(samples, "tasklab_job_duration_seconds"),
            "queue_wait_ms": _latency_ms(samples, "tasklab_job_queue_wait_seconds"),
            "fallback_active": _sum(samples, "tasklab_fallback_active") > 0,
        },
    }


def _started_at() -> float:
    """When the metrics began: the multiprocess directory's start, else this process's."""
    path = multiproc.dir_from_env()
    if path is not None:
        marker = path / multiproc.STARTED_AT_FILE
        try:
            return float(marker.read_text())
        except (OSError, ValueError):
            pass
    return float(psutil.Process().create_time())


def _samples(families: Iterable[Metric]) -> dict[str, list[tuple[Labels, float]]]:
    by_name: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
    for family in families:
        for sample in family.samples:
            by_name[sample.name].append((dict(sample.labels), float(sample.value)))
    return by_name


def _sum(
    samples: Mapping[str, list[tuple[Labels, float]]],
    name: str,
    where: Callable[[Labels], bool] | None = None,
) -> float:
    return sum(v for labels, v in samples.get(name, []) if where is None or where(labels))


def _by_label(
    samples: Mapping[str, list[tuple[Labels, float]]], name: str, label: str
) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        out[labels.get(label, "")] += value
    return dict(out)


def _latency_ms(
    samples: Mapping[str, list[tuple[Labels, float]]], histogram: str
) -> dict[str, float | None]:
    """Mean and P50/P95/P99 over all label sets, interpolated in buckets like Prometheus."""
    count = _sum(samples, f"{histogram}_count")
    buckets: dict[float, float] = defaultdict(float)
    for labels, value in samples.get(f"{histogram}_bucket", []):
        buckets[float(labels["le"])] += value
    out: dict[str, float | None] = {
        "mean": round(_sum(samples, f"{histogram}_sum") / count * 1000, 3) if count else None
    }
    for q in QUANTILES:
        seconds = bucket_quantile(q, sorted(buckets.items()))
        out[f"p{round(q * 100)}"] = None if seconds is None else round(seconds * 1000, 3)
    return out


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` on cumulative (upper bound, count) pairs sorted by bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower_bound  # the +Inf bucket: the highest finite bound is all we know
            in_bucket = cumulative - lower_count
            fraction = (rank - lower_count) / in_bucket if in_bucket else 0.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, cumulative
    return lower_bound
