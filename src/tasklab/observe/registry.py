"""Which metrics each endpoint exposes.

* The API's ``/metrics`` shows what the API, the workers and beat record (all processes sharing
  the multiprocess directory, or just this process), minus the gauges only the exporter sets:
  an API that never measures queue depth must not report ``tasklab_queue_depth 0`` or
  ``tasklab_workers_up 0`` next to the exporter's real values.
* The exporter (``tasklab exporter``) shows exactly those gauges, plus its own process metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import psutil
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Metric,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector

from tasklab.observe import metrics, multiproc

# Measured by the exporter (queues, workers, SQL job counts, Celery events), nowhere else.
EXPORTER_METRICS: tuple[MetricWrapperBase, ...] = (
    metrics.QUEUE_DEPTH,
    metrics.QUEUE_DEPTH_BY_PRIORITY,
    metrics.QUEUE_UNACKED,
    metrics.QUEUE_CONSUMERS,
    metrics.QUEUE_OLDEST_AGE,
    metrics.JOBS_BY_STATUS,
    metrics.WORKERS_UP,
    metrics.WORKER_ACTIVE_TASKS,
    metrics.WORKER_PROCESSES,
    metrics.WORKER_RSS,
    metrics.WORKER_HEARTBEAT_AGE,
    metrics.EXPORTER_REFRESH_SUCCESS,
    metrics.EXPORTER_LAST_SUCCESS,
    *metrics.CELERY_TASK_COUNTERS.values(),
    metrics.CELERY_TASK_RUNTIME,
    metrics.CELERY_TASK_QUEUE_WAIT,
    metrics.CELERY_WORKER_UP,
    metrics.CELERY_WORKER_TASKS_ACTIVE,
)
# Set by beat itself (multiprocess mode) and by the exporter from beat's task-sent events.
EXPORTER_EXTRA_METRICS: tuple[MetricWrapperBase, ...] = (metrics.BEAT_LAST_TICK,)


def family_names(collectors: Iterable[MetricWrapperBase]) -> frozenset[str]:
    return frozenset(family.name for c in collectors for family in c.describe())


class ExcludingCollector(Collector):
    """Everything ``source`` collects except the named metric families."""

    def __init__(self, source: Collector, exclude: frozenset[str]) -> None:
        self._source = source
        self._exclude = exclude

    def collect(self) -> Iterable[Metric]:
        return [f for f in self._source.collect() if f.name not in self._exclude]

    def describe(self) -> Iterable[Metric]:
        return []


class LiveMultiProcessCollector(Collector):
    """``MultiProcessCollector`` that first drops the live gauges of processes gone missing
    and merges the other files of dead processes into the folder's archives, so a scrape
    reads a bounded number of files however many pool children have come and gone."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._inner = MultiProcessCollector(None, path=str(path))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        with multiproc.folder_lock(self._path):
            multiproc.reap_dead_processes(self._path)
            multiproc.compact_dead_processes(self._path)
            families: Iterable[Metric] = list(self._inner.collect())  # type: ignore[no-untyped-call]
        return families

    def describe(self) -> Iterable[Metric]:
        return []


class ProcessGroupCollector(Collector):
    """``process_*`` for all live processes sharing the multiprocess directory, summed.

    In multiprocess mode the per-process collector would describe whichever worker answered
    the scrape; the sum describes the whole group (API workers, Celery children, beat).
    No ``process_cpu_seconds_total``: a sum over processes drops when one exits, and
    ``rate()`` would read that as a counter reset and spike.
    """

    def __init__(self, path: Path) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        rss = vms = fds = 0
        for pid in multiproc.pids_in(self._path):
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    mem = proc.memory_info()
                    fds += proc.num_fds()
            except psutil.Error:
                continue
            rss += mem.rss
            vms += mem.vms
        help_suffix = " (all tasklab processes sharing the multiprocess directory)"
        return [
            GaugeMetricFamily(
                "process_resident_memory_bytes",
                "Resident memory size in bytes" + help_suffix,
                value=rss,
            ),
            GaugeMetricFamily(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes" + help_suffix,
                value=vms,
            ),
            GaugeMetricFamily("process_open_fds", "Open file descriptors" + help_suffix, value=fds),
        ]

    def describe(self) -> Iterable[Metric]:
        return []


def api_registry() -> CollectorRegistry:
    """The registry ``GET /metrics`` serves, multiprocess-aware (decided by the environment)."""
    path = multiproc.dir_from_env()
    source: Collector
    if path is None:
        source = REGISTRY
    else:
        source = CollectorRegistry(auto_describe=False)
        source.register(LiveMultiProcessCollector(path))
        source.register(ProcessGroupCollector(path))
        PlatformCollector(registry=source)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExcludingCollector(source, family_names(EXPORTER_METRICS)))
    return registry


def exporter_registry() -> CollectorRegistry:
    """The registry the exporter serves: its gauges and its own process metrics."""
    registry = CollectorRegistry(auto_describe=True)
    for metric in (*EXPORTER_METRICS, *EXPORTER_EXTRA_METRICS):
        registry.register(metric)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry
