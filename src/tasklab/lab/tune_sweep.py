"""``tasklab tune``, step 2: the configurations to measure and the measurement of each.

A trial runs on its own worker node and queue: a burst of ``burst_n`` tasks (throughput: how
fast the configuration drains work), then ``load_s`` seconds of tasks arriving at a steady
rate, the same for every trial (latency: P95 queue wait at that load).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress

from tasklab.lab import summary
from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig, WorkerNode
from tasklab.lab.progress import phase
from tasklab.lab.workload import CeleryDriver, Driver, Probe, Sample, submit_all
from tasklab.settings import Settings

WORKLOADS = {
    "cpu": Probe("cpu", {"rounds": 10_000}),  # ~10 ms of hashing
    "io": Probe("io", {"seconds": 0.02}),
    "mixed": Probe("mixed", {"rounds": 2_500, "seconds": 0.01}),
}
BOOT_BATCH = 4  # worker nodes booted (and kept idle) at once


@dataclass(frozen=True)
class JobsConfig(WorkerConfig):
    """A worker configuration for the durable-jobs path: the worker's knobs and how many jobs
    of one burst may share a broker message (``bundle_max``, a submit-side setting)."""

    bundle_max: int = 16

    def label(self) -> str:
        return f"{super().label()}, bundle {self.bundle_max}"

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "bundle_max": self.bundle_max}


@dataclass
class Trial:
    config: WorkerConfig
    status: str = "pending"  # measured | skipped | failed
    throughput_per_s: float = 0.0
    latency_ms_p50: float = 0.0  # queue wait (e2e for a named task, which reports no start)
    latency_ms_p95: float = 0.0
    latency_ms_p99: float = 0.0
    run_ms_p50: float = 0.0
    success_pct: float = 0.0
    rate_per_s: float = 0.0
    duration_s: float = 0.0
    error: str = ""

    @property
    def label(self) -> str:
        return self.config.label()

    def row(self, slo_ms: float) -> dict[str, Any]:
        meets = self.status == "measured" and self.latency_ms_p95 <= slo_ms
        return {
            **self.config.as_dict(),
            "status": self.status,
            "throughput_per_s": round(self.throughput_per_s, 1),
            "queue_wait_ms_p50": round(self.latency_ms_p50, 2),
            "queue_wait_ms_p95": round(self.latency_ms_p95, 2),
            "queue_wait_ms_p99": round(self.latency_ms_p99, 2),
            "run_ms_p50": round(self.run_ms_p50, 2),
            "success_pct": round(self.success_pct, 1),
            "rate_per_s": round(self.rate_per_s, 1),
            "duration_s": round(self.duration_s, 2),
            "meets_slo": meets,
            "error": self.error,
        }


def default_grid(cores: int | None = None) -> list[WorkerConfig]:
    n = cores or os.cpu_count() or 1
    return [
        WorkerConfig(pool=pool, concurrency=c, prefetch_multiplier=p)
        for pool in ("prefork", "threads")
        for c in (n, 2 * n)
        for p in (1, 4)
    ]


def parse_grid(
    *,
    pools: str | None = None,
    concurrencies: str | None = None,
    prefetches: str | None = None,
    cores: int | None = None,
) -> list[WorkerConfig]:
    """The sweep from comma-separated CLI values (``--pools prefork,threads --concurrency 2,8
    --prefetch 1,4``); what is not given comes from the default grid."""
    defaults = default_grid(cores)
    pool_list = _split(pools, str) or list(dict.fromkeys(c.pool for c in defaults))
    conc_list = _split(concurrencies, int) or list(dict.fromkeys(c.concurrency for c in defaults))
    pre_list = _split(prefetches, int) or list(
        dict.fromkeys(c.prefetch_multiplier for c in defaults)
    )
    for pool in pool_list:
        if pool not in ("prefork", "threads", "solo"):
            raise LabError(f"unknown pool {pool!r}; one of prefork, threads, solo")
    return [
        WorkerConfig(pool=p, concurrency=c, prefetch_multiplier=f)
        for p in pool_list
        for c in conc_list
        for f in pre_list
    ]


def _split(text: str | None, kind: type[Any]) -> list[Any]:
    if not text:
        return []
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise LabError(f"cannot read {text!r} as a comma-separated list: {e}") from e


def parse_task_args(text: str | None) -> list[Any]:
    """``--args '[64, "x"]'``: the named task's positional arguments, as JSON."""
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError as e:
        raise LabError(f"--args must be a JSON list, e.g. '[64]': {e}") from e
    return value if isinstance(value, list) else [value]


def workload_probe(workload: str, *, task: str | None = None, args: Sequence[Any] = ()) -> Probe:
    if task is not None:
        return Probe("task", task=task, args=tuple(args))
    try:
        return WORKLOADS[workload]
    except KeyError:
        raise LabError(
            f"unknown workload {workload!r}; one of {sorted(WORKLOADS)} or --task NAME"
        ) from None


@dataclass
class Sweep:
    stack: LabStack
    probe: Probe
    progress: Progress
    burst_n: int = 100
    load_s: float = 2.0
    rate_per_s: float | None = None  # steady-load rate; default: half the first trial's rate
    budget_s: float = 60.0
    submitters: int = 1  # threads submitting the burst
    trials: list[Trial] = field(default_factory=list)

    def run(self, grid: Sequence[WorkerConfig]) -> list[Trial]:
        self.trials = [Trial(c) for c in grid]
        deadline = time.monotonic() + self.budget_s
        for start in range(0, len(self.trials), BOOT_BATCH):
            batch = self.trials[start : start + BOOT_BATCH]
            if time.monotonic() + self._estimate_s() > deadline:
                _skip(batch, "time budget spent")
                continue
            self._run_batch(batch, start, deadline)
        return self.trials

    def _estimate_s(self) -> float:
        done = [t.duration_s for t in self.trials if t.status == "measured"]
        return sum(done) / len(done) if done else 0.0

    def _run_batch(self, batch: list[Trial], offset: int, deadline: float) -> None:
        queues = [f"lab-tune-{self.stack.run_id}-{offset + i}" for i in range(len(batch))]
        nodes = [self.spawn(t.config, q) for t, q in zip(batch, queues, strict=True)]
        try:
            self.stack.wait_ready(nodes)
            self.stack.wait_idle(nodes)  # booting neighbours would steal the first trial's CPU
            for trial, queue in zip(batch, queues, strict=True):
                if time.monotonic() + self._estimate_s() > deadline:
                    _skip([trial], "time budget spent")
                    continue
                self._measure(trial, queue)
        finally:
            self.stack.stop_nodes(nodes)

    def spawn(self, config: WorkerConfig, queue: str) -> WorkerNode:
        """One worker node for ``config``, consuming ``queue`` only (not waited for)."""
        return self.stack.spawn(config, queue=queue, settings=self.node_settings(config))

    def node_settings(self, config: WorkerConfig) -> Settings | None:
        """A trial node's settings: no /metrics of its own, since up to BOOT_BATCH nodes boot
        at once and would race for the default metrics port (a loser exits at start)."""
        if not self.stack.own:
            return None
        return self.stack.settings.model_copy(update={"worker_metrics_port": 0})

    def driver(self, trial: Trial, queue: str) -> Driver:
        """How a trial's tasks are submitted and collected: raw Celery here."""
        return CeleryDriver(self.stack.celery, queue=queue)

    def close(self) -> None:
        """Release what the trials opened (nothing here: the stack owns the Celery app)."""

    def _measure(self, trial: Trial, queue: str) -> None:
        driver = self.driver(trial, queue)
        started = time.monotonic()
        total = self.burst_n + trial.config.concurrency
        with phase(self.progress, f"trial {trial.label}", total) as update:
            warm = submit_all(driver, [self.probe] * trial.config.concurrency)
            driver.collect(warm, timeout_s=60)
            burst = driver.collect(
                submit_all(driver, [self.probe] * self.burst_n, submitters=self.submitters),
                timeout_s=120,
                progress=lambda d: update(len(warm) + d),
            )
        trial.throughput_per_s = summary.execution_rate_per_s(burst) or summary.throughput_per_s(
            burst
        )
        if self.rate_per_s is None:
            self.rate_per_s = max(1.0, trial.throughput_per_s / 2)
        steady = self._steady(driver, trial)
        self._record(trial, burst, steady)
        trial.duration_s = time.monotonic() - started

    def _steady(self, driver: Driver, trial: Trial) -> list[Sample]:
        """Tasks arriving every 1/rate s for load_s s (open loop: the schedule does not wait
        for the workers)."""
        rate = float(self.rate_per_s or 1.0)
        n = max(10, int(rate * self.load_s))
        tickets = []
        t0 = time.monotonic()
        for i in range(n):
            pause = t0 + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            tickets.append(driver.submit(self.probe))
        trial.rate_per_s = rate
        return driver.collect(tickets, timeout_s=120)

    def _record(self, trial: Trial, burst: list[Sample], steady: list[Sample]) -> None:
        field_name = "queue_wait_ms" if any(s.started_at for s in steady) else "e2e_ms"
        p = summary.percentiles_of(steady, field_name, prefix="lat")
        trial.latency_ms_p50, trial.latency_ms_p95 = p["lat_p50"], p["lat_p95"]
        trial.latency_ms_p99 = p["lat_p99"]
        trial.run_ms_p50 = summary.percentiles_of(burst, "run_ms", prefix="run")["run_p50"]
        everything = [*burst, *steady]
        trial.success_pct = summary.outcome_figures(everything)["success_pct"]
        trial.status = "measured"


def _skip(trials: Sequence[Trial], reason: str) -> None:
    for t in trials:
        t.status, t.error = "skipped", reason
