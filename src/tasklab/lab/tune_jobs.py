"""``tasklab tune --dimension jobs``: the durable-jobs path's knobs, measured the way
``bench --dimension jobs`` submits (``JobManager.submit`` from several threads, timestamps from
the job records).

The knobs: the worker's pool, concurrency and prefetch, and ``bundle_max`` (how many jobs
submitted together may share one broker message; 1 is one message per job). Each
configuration gets its own worker node and queue, and a ``JobManager`` with its
``bundle_max``; the trial, the recommendation and its verification are tune's
(tasklab.lab.tune_sweep, tune_recommend, tune_verify).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasklab.lab.errors import LabError
from tasklab.lab.harness import WorkerConfig
from tasklab.lab.tune_sweep import JobsConfig, Sweep, Trial, _split, parse_grid
from tasklab.lab.workload import Driver, JobsDriver, Probe
from tasklab.settings import Settings

if TYPE_CHECKING:
    from tasklab.jobs import JobManager

DIMENSIONS = ("celery", "jobs")
JOB_WORKLOADS = {
    "noop": Probe("noop"),  # the path's own cost: what bundling saves shows in full
    "io": Probe("io", {"seconds": 0.02}),
}
DEFAULT_JOBS_WORKLOAD = "noop"
JOBS_BURST_N = 500  # per trial: long enough for the relay to form bundles
JOBS_SUBMITTERS = 4  # as bench --dimension jobs
JOBS_BUDGET_S = 120.0
BUNDLE_MAX_LIMIT = 1000  # tasklab.settings.Settings.bundle_max's bound


def check_dimension(dimension: str) -> str:
    if dimension not in DIMENSIONS:
        raise LabError(f"unknown --dimension {dimension!r}; one of {', '.join(DIMENSIONS)}")
    return dimension


def jobs_baseline(settings: Settings) -> JobsConfig:
    """The current settings, as the jobs path runs them."""
    worker = WorkerConfig.from_settings(settings)
    return JobsConfig(**worker.as_dict(), bundle_max=settings.bundle_max)


def as_jobs_config(config: WorkerConfig, settings: Settings) -> JobsConfig:
    if isinstance(config, JobsConfig):
        return config
    return JobsConfig(**config.as_dict(), bundle_max=settings.bundle_max)


def default_jobs_grid(settings: Settings, cores: int | None = None) -> list[JobsConfig]:
    """Prefork and threads at 1x and 2x the cores, the current prefetch, and bundles of 1
    (one message per job), the current ``bundle_max`` and four times it."""
    n = cores or os.cpu_count() or 1
    bundles = _bundles_around(settings.bundle_max)
    return [
        JobsConfig(pool=pool, concurrency=c, prefetch_multiplier=p, bundle_max=b)
        for pool in ("prefork", "threads")
        for c in (n, 2 * n)
        for p in (settings.worker_prefetch_multiplier,)
        for b in bundles
    ]


def _bundles_around(current: int) -> list[int]:
    return list(dict.fromkeys([1, current, min(BUNDLE_MAX_LIMIT, 4 * current)]))


def parse_jobs_grid(
    settings: Settings,
    *,
    pools: str | None = None,
    concurrencies: str | None = None,
    prefetches: str | None = None,
    bundles: str | None = None,
    cores: int | None = None,
) -> list[JobsConfig]:
    """The jobs sweep from comma-separated CLI values; what is not given comes from
    ``default_jobs_grid``."""
    defaults = default_jobs_grid(settings, cores)
    workers = parse_grid(
        pools=pools or ",".join(dict.fromkeys(c.pool for c in defaults)),
        concurrencies=concurrencies or ",".join(str(c) for c in _unique(defaults, "concurrency")),
        prefetches=prefetches or ",".join(str(p) for p in _unique(defaults, "prefetch_multiplier")),
        cores=cores,
    )
    bundle_list = _split(bundles, int) or _unique(defaults, "bundle_max")
    for b in bundle_list:
        if not 1 <= b <= BUNDLE_MAX_LIMIT:
            raise LabError(f"--bundle-max {b}: each value must be 1 to {BUNDLE_MAX_LIMIT}")
    for c in _unique(workers, "concurrency"):
        if c < 1:
            raise LabError(f"--concurrency {c}: each value must be 1 or more")
    for p in _unique(workers, "prefetch_multiplier"):
        if p < 1:
            raise LabError(f"--prefetch {p}: each value must be 1 or more")
    return [JobsConfig(**w.as_dict(), bundle_max=b) for w in workers for b in bundle_list]


def _unique(configs: list[Any], attr: str) -> list[int]:
    return list(dict.fromkeys(int(getattr(c, attr)) for c in configs))


def jobs_probe(workload: str | None, *, task: str | None = None, args: Any = ()) -> Probe:
    """A probe job (``noop``, ``io``) or a job declared by name (``--task``)."""
    if task is not None:
        return Probe("task", task=task, args=tuple(args))
    name = workload or DEFAULT_JOBS_WORKLOAD
    try:
        return JOB_WORKLOADS[name]
    except KeyError:
        raise LabError(
            f"unknown workload {name!r} for --dimension jobs; one of {sorted(JOB_WORKLOADS)} "
            "or --task NAME"
        ) from None


@dataclass
class JobsSweep(Sweep):
    """``Sweep`` on the durable-jobs path: each trial's jobs go through a ``JobManager`` with
    the trial's ``bundle_max``, to a worker node started with the same settings."""

    submitters: int = JOBS_SUBMITTERS
    managers: dict[int, JobManager] = field(default_factory=dict)
    _batches: itertools.count[int] = field(default_factory=itertools.count)

    def settings_for(self, config: WorkerConfig) -> Settings:
        bundle_max = config.bundle_max if isinstance(config, JobsConfig) else 1
        return self.stack.settings.model_copy(update={"bundle_max": bundle_max})

    def node_settings(self, config: WorkerConfig) -> Settings:
        return self.settings_for(config).model_copy(update={"worker_metrics_port": 0})

    def driver(self, trial: Trial, queue: str) -> Driver:
        return JobsDriver(
            self.manager(trial.config),
            owner=self.stack.owner(f"tune-{next(self._batches)}"),
            queue=queue,
        )

    def manager(self, config: WorkerConfig) -> JobManager:
        """One submitting ``JobManager`` per ``bundle_max``, on the run's database."""
        import tasklab.lab.probe_jobs  # noqa: F401  (declares the probe jobs)
        from tasklab.jobs import JobManager

        settings = self.settings_for(config)
        if settings.bundle_max not in self.managers:
            self.managers[settings.bundle_max] = JobManager(settings)
        return self.managers[settings.bundle_max]

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()
        self.managers.clear()
