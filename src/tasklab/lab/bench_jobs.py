"""``bench --dimension jobs``: raw Celery against tasklab's durable jobs, on equal terms.

Three paths, the same task, the same worker processes and Celery settings. The task is the
shared peer harness's: one Redis round trip of bookkeeping (``--task-body counted``, the
default; ``noop`` does nothing at all):

- ``celery``: ``apply_async`` from a publishing app (no task-sent event), a probe that writes
  no STARTED state; its one SUCCESS result in Redis is how it is timed (tasklab writes its
  outcome once too, to SQL);
- ``tasklab_b1``: ``JobManager.submit`` with ``bundle_max=1``: a job row, one broker message
  per job, the lease and the outcome in SQL;
- ``tasklab``: ``JobManager.submit`` with its defaults (up to ``bundle_max`` jobs of one
  burst travel in one broker message).

Each is measured two ways: **live** (several submitters as fast as they can while the
workers consume; first submit to last finish) and **worker-bound** (the queue filled first
with nobody consuming, then drained; the workers' rate alone). Each round runs the paths in a
shuffled order; ``repeat`` rounds give each figure's median and its spread (min, max). Unless
told how many tasks to run, a short pilot of each path sizes its trials so that each live
window lasts ``jobs_window_s`` at the pilot's rate.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tasklab.lab import summary
from tasklab.lab.progress import phase
from tasklab.lab.results import Series
from tasklab.lab.workload import CeleryDriver, Driver, JobsDriver, Probe, submit_all

if TYPE_CHECKING:
    from tasklab.jobs import JobManager
    from tasklab.lab.bench import Bench

PATHS = ("celery", "tasklab_b1", "tasklab")
# --task-body: (raw Celery's probe, the jobs' probe)
BODIES = {
    "counted": (Probe("counted_untracked"), Probe("counted")),
    "noop": (Probe("noop_untracked"), Probe("noop")),
}
MIN_WINDOW_S = 10.0
PILOT_N = 2000  # tasks of a path's sizing pilot (its figures are not kept)
MAX_N = 200_000  # per trial, whatever the pilot's rate
INCLUDES = {
    "celery": "apply_async, no task-sent event, no STARTED write, one SUCCESS result in Redis",
    "tasklab_b1": "JobManager.submit, bundle_max=1: job row + one message per job; lease and "
    "outcome in SQL",
    "tasklab": "JobManager.submit, defaults (bundles of up to bundle_max jobs per message)",
}


def spread(values: Sequence[float], name: str) -> dict[str, float]:
    """``name`` (the median), ``name_min`` and ``name_max`` of repeated measurements."""
    if not values:
        return {}
    return {
        name: float(statistics.median(values)),
        f"{name}_min": float(min(values)),
        f"{name}_max": float(max(values)),
    }


class JobsBench:
    """The jobs dimension of one bench run."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.stack = bench.stack
        self.sizes = bench.sizes
        self.rounds: list[dict[str, Any]] = []
        self._b1: JobManager | None = None
        self._n: dict[str, int] = {}  # tasks per live trial, by path

    def run(self, *, repeat: int, rng: random.Random) -> None:
        try:
            self._size(rng)
            for round_no in range(1, repeat + 1):
                order = list(PATHS)
                rng.shuffle(order)
                for path in order:
                    self.rounds.append({"round": round_no, "path": path, **self._measure(path)})
        finally:
            if self._b1 is not None:
                self._b1.close()
        self._record()

    def _size(self, rng: random.Random) -> None:
        """Tasks per trial: ``jobs_n``, or more where a pilot's rate says a window of
        ``jobs_n`` would be shorter than ``jobs_window_s``."""
        window_s = self.sizes.jobs_window_s
        for path in rng.sample(PATHS, len(PATHS)):
            self._n[path] = self.sizes.jobs_n
            if window_s > 0:
                rate = self._live(path, n=PILOT_N, first=False, pilot=True)["throughput_per_s"]
                self._n[path] = trial_size(rate, at_least=self.sizes.jobs_n, window_s=window_s)
        self.bench.result.params["jobs_tasks_per_trial"] = dict(self._n)

    # --- one path, one round --------------------------------------------------------------
    def _driver(self, path: str, queue: str) -> tuple[Driver, Probe]:
        celery_probe, job_probe = BODIES[self.sizes.jobs_body]
        if path == "celery":
            return CeleryDriver(
                self._publishing_app(), queue=queue, priority_of=self.stack.priority
            ), celery_probe
        manager = self.stack.jobs if path == "tasklab" else self._bundle_of_one()
        return JobsDriver(manager, owner=self.stack.owner(f"jobs-{path}"), queue=queue), job_probe

    def _publishing_app(self) -> Any:
        from tasklab.celery_app import make_celery

        if not hasattr(self, "_app"):
            self._app = make_celery(self.stack.settings, for_publishing=True)
        return self._app

    def _bundle_of_one(self) -> JobManager:
        from tasklab.jobs import JobManager

        if self._b1 is None:
            self._b1 = JobManager(self.stack.settings.model_copy(update={"bundle_max": 1}))
        return self._b1

    def _measure(self, path: str) -> dict[str, float]:
        first = not any(r["path"] == path for r in self.rounds)
        live = self._live(path, n=self._n[path], first=first)
        drained = self._drain(path)
        return {**live, **drained}

    def _live(self, path: str, *, n: int, first: bool, pilot: bool = False) -> dict[str, float]:
        driver, probe = self._driver(path, self.stack.queue)
        worker_cpu_s, own_cpu_s = self.stack.worker_cpu_s(), time.process_time()
        name = f"jobs {'pilot' if pilot else 'live'} ({path})"
        with phase(self.bench.progress, name, n) as update:
            tickets = submit_all(driver, [probe] * n, submitters=self.sizes.jobs_submitters)
            samples = driver.collect(tickets, timeout_s=self.sizes.timeout_s, progress=update)
        figures = summary.summarize(samples, tickets)
        if first:  # one round's curves per path: the figures carry the spread
            self._series(path, samples)
        done = [s.finished_at for s in samples if s.finished_at is not None]
        window_s = (max(done) - min(t.sent_at for t in tickets)) if done else 0.0
        out = {
            "throughput_per_s": figures["throughput_per_s"],
            "e2e_ms_p50": figures.get("e2e_ms_p50", 0.0),
            "e2e_ms_p99": figures.get("e2e_ms_p99", 0.0),
            "submit_ms_p99": figures.get("submit_ms_p99", 0.0),
            "succeeded": figures.get("succeeded", 0.0),
            "lost": figures.get("lost", 0.0),
            "window_s": window_s,
            "submit_cpu_ms_per_job": (time.process_time() - own_cpu_s) * 1e3 / n,
        }
        worker_ms = (self.stack.worker_cpu_s() - worker_cpu_s) * 1e3 / n
        if worker_ms >= 0:
            out["worker_cpu_ms_per_job"] = worker_ms
        else:  # a pool process was recycled mid-trial and took its CPU time with it
            self.bench.result.notes.append(
                f"jobs.{path}: worker CPU not measured in one trial (a pool process was "
                "replaced during it)"
            )
        return out

    def _series(self, path: str, samples: Sequence[Any]) -> None:
        self.bench.result.series += [
            summary.cdf_series(samples, chart="bench jobs: end-to-end latency", label=path),
            Series(
                "bench jobs: completions per second",
                path,
                "line",
                "seconds",
                "tasks/s",
                summary.completions_over_time(samples),
            ),
        ]

    def _drain(self, path: str) -> dict[str, float]:
        idle = self.stack.idle_queue
        control = self.stack.celery.control
        driver, probe = self._driver(path, idle)
        n = self.sizes.jobs_drain_n
        with phase(self.bench.progress, f"jobs worker-bound ({path})", n) as update:
            tickets = submit_all(driver, [probe] * n, submitters=self.sizes.jobs_submitters)
            _wait_published(driver, tickets)
            control.add_consumer(idle, destination=self.stack.destinations(), reply=True)
            try:
                samples = driver.collect(tickets, timeout_s=self.sizes.timeout_s, progress=update)
            finally:
                control.cancel_consumer(idle, destination=self.stack.destinations(), reply=True)
        return {"drain_per_s": summary.execution_rate_per_s(samples)}

    # --- the figures ----------------------------------------------------------------------
    def _record(self) -> None:
        figures: dict[str, float] = {}
        for path in PATHS:
            rows = [r for r in self.rounds if r["path"] == path]
            keys = {k for r in rows for k in r} - {"round", "path"}
            for key in sorted(keys):
                values = [float(r[key]) for r in rows if key in r]
                figures.update(spread(values, f"{path}_{key}"))
        figures.update(self._ratios())
        self.bench.figures("jobs", figures)
        result = self.bench.result
        result.tables["jobs"] = [{k: _round(v) for k, v in r.items()} for r in self.rounds]
        result.tables["jobs.includes"] = [{"path": p, "includes": INCLUDES[p]} for p in PATHS]
        result.params["jobs_repeat"] = max(r["round"] for r in self.rounds)
        short = [r for r in self.rounds if r["window_s"] < MIN_WINDOW_S]
        if short:
            result.notes.append(
                f"jobs: {len(short)} live window(s) shorter than {MIN_WINDOW_S:g} s (shortest "
                f"{min(r['window_s'] for r in short):.1f} s): raise --tasks for a steady figure"
            )
        result.notes += [f"jobs.{p}: {INCLUDES[p]}" for p in PATHS]

    def _ratios(self) -> dict[str, float]:
        """tasklab over raw Celery, per round (same round, neighbouring trials), then their
        median and spread."""
        out: dict[str, float] = {}
        for path, suffix in (("tasklab", ""), ("tasklab_b1", "_b1")):
            for key, name in (
                ("throughput_per_s", "throughput_ratio"),
                ("drain_per_s", "drain_ratio"),
            ):
                per_round = [
                    _ratio(self._value(r, path, key), self._value(r, "celery", key))
                    for r in sorted({row["round"] for row in self.rounds})
                ]
                out.update(spread(per_round, f"{name}{suffix}"))
        return out

    def _value(self, round_no: int, path: str, key: str) -> float:
        return float(
            next(r[key] for r in self.rounds if r["round"] == round_no and r["path"] == path)
        )


def trial_size(rate_per_s: float, *, at_least: int, window_s: float) -> int:
    """Tasks for a live window of ``window_s`` at ``rate_per_s``, never fewer than
    ``at_least`` nor more than MAX_N; ``at_least`` when the rate is unknown."""
    if rate_per_s <= 0 or window_s <= 0:
        return at_least
    return min(MAX_N, max(at_least, math.ceil(rate_per_s * window_s)))


def _wait_published(driver: Driver, tickets: Sequence[Any], timeout_s: float = 30.0) -> None:
    """tasklab's relay publishes behind ``submit``: the queue is full once it is done."""
    flush: Callable[..., Any] | None = getattr(getattr(driver, "manager", None), "flush", None)
    if flush is not None:
        flush(timeout_s=timeout_s)
    del tickets


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value
