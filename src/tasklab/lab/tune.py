"""``tasklab tune``: look at the system, the running workers and the Celery config, then measure
worker configurations and recommend one.

1. **Analyse**: cores, memory and load; every running worker's ``inspect stats``/``conf``
   (pool, concurrency, prefetch, tasks processed, rusage); risky Celery settings (see
   ``config_risks``).
2. **Measure**: sweep pool x concurrency x prefetch on a probe workload (``cpu``, ``io``,
   ``mixed``) or a named task, each configuration on its own worker and queue, within a time
   budget. A trial has two phases: a burst of ``burst_n`` tasks (throughput: how fast the
   configuration drains work), then ``load_s`` seconds of tasks arriving at a steady rate, the
   same for every trial (latency: P95 queue wait at that load).
3. **Recommend** the configuration with the best throughput whose P95 queue wait meets the SLO,
   with the comparisons that justify it; ``write_config`` writes it as an env file or a Celery
   config module.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tasklab.lab import summary
from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.progress import lab_progress, phase
from tasklab.lab.results import LabResult, Target, finish, resolve_targets
from tasklab.lab.workload import CeleryDriver, Probe, Sample, submit_all
from tasklab.settings import Settings

WORKLOADS = {
    "cpu": Probe("cpu", {"rounds": 10_000}),  # ~10 ms of hashing
    "io": Probe("io", {"seconds": 0.02}),
    "mixed": Probe("mixed", {"rounds": 2_500, "seconds": 0.01}),
}
DEFAULT_SLO_MS = 100.0  # seed: P95 < 100 ms
DEFAULT_TARGETS = (Target("tune.best_queue_wait_ms_p95", "<=", DEFAULT_SLO_MS),)
BOOT_BATCH = 4  # worker nodes booted (and kept idle) at once
MIN_SUCCESS_PCT = 95.0
REDIS_DEFAULT_VISIBILITY_S = 3600.0
CLOSE_CALL_PCT = 5.0  # throughput gaps below this are within one short trial's noise


# --- analysis -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Risk:
    setting: str
    where: str  # "app config" or a worker's name
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"setting": self.setting, "where": self.where, "message": self.message}


def analyse_system() -> dict[str, float]:
    mem = psutil.virtual_memory()
    load1, load5, _ = os.getloadavg()
    return {
        "cores": float(os.cpu_count() or 1),
        "memory_gb": mem.total / 1e9,
        "memory_available_gb": mem.available / 1e9,
        "load_1m": load1,
        "load_5m": load5,
    }


def config_risks(
    conf: Mapping[str, Any], *, where: str = "app config", long_task_s: float | None = None
) -> list[Risk]:
    """Settings that lose, duplicate or starve tasks, or let memory grow without bound."""
    risks: list[Risk] = []

    def add(setting: str, message: str) -> None:
        risks.append(Risk(setting, where, message))

    if conf.get("task_acks_late") and not conf.get("task_reject_on_worker_lost"):
        add(
            "task_reject_on_worker_lost",
            "late acks without reject-on-worker-lost: a task whose "
            "worker process dies is acknowledged as failed, not redelivered",
        )
    longest = _longest_task_s(conf)
    visibility = _visibility_timeout_s(conf)
    if visibility is not None and longest is not None and visibility <= longest:
        add(
            "visibility_timeout",
            f"visibility timeout {visibility:.0f} s <= the longest time "
            f"limit {longest:.0f} s: long or delayed tasks get delivered a second time",
        )
    prefetch = int(conf.get("worker_prefetch_multiplier") or 4)
    if prefetch > 1 and long_task_s is not None and long_task_s >= 1.0:
        add(
            "worker_prefetch_multiplier",
            f"prefetch {prefetch} with tasks of ~{long_task_s:.1f} "
            "s: reserved tasks wait behind a busy process while others idle; use 1",
        )
    elif prefetch >= 16:
        add(
            "worker_prefetch_multiplier",
            f"prefetch {prefetch} is high: tasks sit reserved on "
            "one worker; fine only for very short tasks",
        )
    if conf.get("result_backend") and not conf.get("result_expires"):
        add("result_expires", "results never expire: the result backend grows without bound")
    if not conf.get("worker_max_tasks_per_child") and not conf.get("worker_max_memory_per_child"):
        add(
            "worker_max_tasks_per_child",
            "no max-tasks or max-memory per child: a leaking task "
            "grows its worker process until the machine swaps or the OOM killer steps in",
        )
    return risks


def _longest_task_s(conf: Mapping[str, Any]) -> float | None:
    limits = [conf.get("task_time_limit"), conf.get("task_soft_time_limit")]
    values = [float(v) for v in limits if v]
    return max(values) if values else None


def _visibility_timeout_s(conf: Mapping[str, Any]) -> float | None:
    broker = str(conf.get("broker_url") or "")
    if not broker.startswith(("redis", "rediss", "sqs", "unix")):
        return None
    options = conf.get("broker_transport_options") or {}
    return float(options.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_S))


def app_conf(app: Celery) -> dict[str, Any]:
    keys = (
        "task_acks_late",
        "task_reject_on_worker_lost",
        "task_time_limit",
        "task_soft_time_limit",
        "broker_transport_options",
        "broker_url",
        "worker_prefetch_multiplier",
        "result_backend",
        "result_expires",
        "worker_max_tasks_per_child",
        "worker_max_memory_per_child",
        "worker_concurrency",
        "worker_pool",
    )
    return {k: app.conf.get(k) for k in keys}


def analyse_workers(
    app: Celery, *, timeout_s: float = 1.0
) -> tuple[list[dict[str, Any]], list[Risk]]:
    """One row per running worker (from ``inspect stats``), and the risks in its ``conf``."""
    inspect = app.control.inspect(timeout=timeout_s)
    stats = inspect.stats() or {}
    confs = inspect.conf(with_defaults=True) or {}
    rows, risks = [], []
    for name, info in sorted(stats.items()):
        pool = info.get("pool") or {}
        rusage = info.get("rusage") or {}
        rows.append(
            {
                "worker": name,
                "pool": _pool_name(pool.get("implementation")),
                "concurrency": pool.get("max-concurrency"),
                "prefetch_count": info.get("prefetch_count"),
                "processed": sum((info.get("total") or {}).values()),
                "maxrss_mb": round(float(rusage.get("maxrss", 0)) / 1024, 1),
                "cpu_s": round(float(rusage.get("utime", 0)) + float(rusage.get("stime", 0)), 2),
            }
        )
        if name in confs:
            risks += config_risks(confs[name], where=name)
    return rows, risks


def _pool_name(implementation: Any) -> str:
    text = str(implementation or "")
    for name in ("prefork", "threads", "solo", "eventlet", "gevent"):
        if name in text or (name == "prefork" and "prefork" in text.lower()):
            return name
    return text.rsplit(":", 1)[-1] or "?"


def running_broker_app(settings: Settings, app_spec: str | None) -> Celery | None:
    """An app on the broker the user's workers consume, if one answers: the user's app, the
    configured broker, or the embedded Redis of a running ``tasklab up``."""
    from tasklab.celery_app import make_celery
    from tasklab.lab.harness import load_app

    if app_spec is not None:
        app = load_app(app_spec)
        return app if _answers(str(app.conf.broker_url or "")) else None
    url = settings.broker_url or settings.redis_url or _running_embedded_url(settings)
    if url is None or not _answers(url):
        return None
    return make_celery(settings.model_copy(update={"broker_url": url}), include=[])


def _running_embedded_url(settings: Settings) -> str | None:
    pidfile = settings.home_dir / "redis" / "redis.pid.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(pidfile.read_text())
        if psutil.pid_exists(int(record["server_pid"])):
            return f"redis://127.0.0.1:{int(record['port'])}/0"
    return None


def _answers(url: str) -> bool:
    if not url:
        return False
    if url.startswith(("redis", "rediss", "unix")):
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
            with contextlib.closing(client):
                return bool(client.ping())
        except redis.RedisError:
            return False
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, timeout=2)
            return True
    except Exception:  # any transport error means "not reachable"
        return False


# --- measurement ----------------------------------------------------------------------------------


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
        nodes = [self.stack.spawn(t.config, queue=q) for t, q in zip(batch, queues, strict=True)]
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

    def _measure(self, trial: Trial, queue: str) -> None:
        driver = CeleryDriver(self.stack.celery, queue=queue)
        started = time.monotonic()
        total = self.burst_n + trial.config.concurrency
        with phase(self.progress, f"trial {trial.label}", total) as update:
            warm = submit_all(driver, [self.probe] * trial.config.concurrency)
            driver.collect(warm, timeout_s=60)
            burst = driver.collect(
                submit_all(driver, [self.probe] * self.burst_n),
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

    def _steady(self, driver: CeleryDriver, trial: Trial) -> list[Sample]:
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


# --- recommendation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    config: WorkerConfig | None
    meets_slo: bool
    reasons: list[str]


def recommend(
    trials: Sequence[Trial], *, slo_ms: float, baseline: WorkerConfig | None = None
) -> Recommendation:
    measured = [t for t in trials if t.status == "measured" and t.success_pct >= MIN_SUCCESS_PCT]
    if not measured:
        return Recommendation(None, False, ["no trial completed; nothing to recommend"])
    ok = [t for t in measured if t.latency_ms_p95 <= slo_ms]
    rate = measured[0].rate_per_s
    if ok:
        best = max(ok, key=lambda t: t.throughput_per_s)
        reasons = [
            f"{best.label}: {best.throughput_per_s:,.0f} tasks/s, the best throughput of "
            f"the {len(ok)} of {len(measured)} configurations whose P95 queue wait at "
            f"{rate:,.0f} tasks/s stays within {slo_ms:g} ms "
            f"({best.latency_ms_p95:.1f} ms)"
        ]
    else:
        best = min(measured, key=lambda t: t.latency_ms_p95)
        reasons = [
            f"no configuration kept P95 queue wait within {slo_ms:g} ms at {rate:,.0f} "
            f"tasks/s; {best.label} came closest ({best.latency_ms_p95:.1f} ms): add "
            "workers or make the tasks shorter"
        ]
    reasons += _close_call(best, ok)
    reasons += _comparisons(best, measured, baseline)
    return Recommendation(best.config, bool(ok), reasons)


def _close_call(best: Trial, candidates: Sequence[Trial]) -> list[str]:
    """Name a runner-up within the noise of one short trial, so nobody over-reads the pick."""
    others = [t for t in candidates if t is not best]
    if not others or not best.throughput_per_s:
        return []
    second = max(others, key=lambda t: t.throughput_per_s)
    gap_pct = (1 - second.throughput_per_s / best.throughput_per_s) * 100
    if gap_pct >= CLOSE_CALL_PCT:
        return []
    return [
        f"{second.label} is within {gap_pct:.0f} % ({second.throughput_per_s:,.0f} tasks/s): "
        "treat them as equal, or rerun with a larger --burst to separate them"
    ]


def _comparisons(
    best: Trial, measured: Sequence[Trial], baseline: WorkerConfig | None
) -> list[str]:
    out = []
    base = next((t for t in measured if t.config == baseline), None)
    if base is not None and base is not best and base.throughput_per_s:
        gain = (best.throughput_per_s / base.throughput_per_s - 1) * 100
        out.append(
            f"{gain:+.0f} % throughput against the current settings ({base.label}: "
            f"{base.throughput_per_s:,.0f} tasks/s, P95 queue wait "
            f"{base.latency_ms_p95:.1f} ms)"
        )
    by_pool: dict[str, Trial] = {}
    for t in measured:
        if (
            t.config.pool not in by_pool
            or t.throughput_per_s > by_pool[t.config.pool].throughput_per_s
        ):
            by_pool[t.config.pool] = t
    if len(by_pool) > 1:
        out.append(
            "best per pool: "
            + ", ".join(
                f"{pool} {t.throughput_per_s:,.0f}/s ({t.label})" for pool, t in by_pool.items()
            )
        )
    out += _knob_effect(best, measured, "prefetch_multiplier", "prefetch")
    out += _knob_effect(best, measured, "concurrency", "concurrency")
    return out


def _knob_effect(best: Trial, measured: Sequence[Trial], knob: str, name: str) -> list[str]:
    """How the best configuration fares when only ``knob`` changes."""
    others = [
        t
        for t in measured
        if t is not best
        and all(
            getattr(t.config, k) == getattr(best.config, k)
            for k in ("pool", "concurrency", "prefetch_multiplier", "nodes")
            if k != knob
        )
    ]
    return [
        f"{name} {getattr(best.config, knob)} vs {getattr(t.config, knob)}: "
        f"{best.throughput_per_s:,.0f} vs {t.throughput_per_s:,.0f} tasks/s, P95 queue wait "
        f"{best.latency_ms_p95:.1f} vs {t.latency_ms_p95:.1f} ms"
        for t in others
    ]


def write_config(path: Path, config: WorkerConfig, *, comment: str) -> Path:
    """``*.py``: a Celery config module (``app.config_from_object``); anything else: an env
    file of ``TASKLAB_WORKER_*`` variables."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".py":
        text = (
            f'"""Celery worker settings recommended by `tasklab tune`.\n\n{comment}\n\n'
            'Load with ``app.config_from_object("<this module>")``.\n"""\n\n'
            f"worker_pool = {config.pool!r}\nworker_concurrency = {config.concurrency}\n"
            f"worker_prefetch_multiplier = {config.prefetch_multiplier}\n"
        )
    else:
        lines = [f"# {line}" for line in comment.splitlines()]
        text = "\n".join(
            [
                *lines,
                f"TASKLAB_WORKER_POOL={config.pool}",
                f"TASKLAB_WORKER_CONCURRENCY={config.concurrency}",
                f"TASKLAB_WORKER_PREFETCH_MULTIPLIER={config.prefetch_multiplier}",
                "",
            ]
        )
    path.write_text(text)
    return path


# --- the command ----------------------------------------------------------------------------------


def run_tune(
    settings: Settings,
    *,
    workload: str = "mixed",
    task: str | None = None,
    task_args: Sequence[Any] = (),
    app_spec: str | None = None,
    grid: Sequence[WorkerConfig] | None = None,
    burst_n: int = 100,
    load_s: float = 2.0,
    rate_per_s: float | None = None,
    budget_s: float = 60.0,
    write: Path | None = None,
    targets: Sequence[str] = (),
    console: Console | None = None,
    repeat: int = 3,
    seed: int | None = None,
) -> LabResult:
    """Analyse, sweep, recommend, verify the recommendation against the current settings in
    ``repeat`` interleaved rounds (tasklab.lab.tune_verify); write the result (and ``write``
    the config if asked and verified)."""
    import random

    from tasklab.lab.tune_verify import verified

    console = console or Console()
    probe = workload_probe(workload, task=task, args=task_args)
    slos = resolve_targets(DEFAULT_TARGETS, targets)
    slo_ms = next(
        (t.value for t in slos if t.applies_to("tune.best_queue_wait_ms_p95")), DEFAULT_SLO_MS
    )
    baseline = WorkerConfig.from_settings(settings)
    configs = _with_baseline_first(list(grid or default_grid()), baseline)
    result = LabResult(
        "tune",
        params={
            "workload": task or workload,
            "app": app_spec,
            "burst_n": burst_n,
            "load_s": load_s,
            "budget_s": budget_s,
            "slo_queue_wait_ms_p95": slo_ms,
            "grid": [c.as_dict() for c in configs],
            "verify_repeat": repeat,
        },
    )
    _analyse(settings, app_spec, result)
    with (
        LabStack(settings, app_spec=app_spec, workers="none") as stack,
        lab_progress(console) as progress,
    ):
        result.params["broker"] = stack.broker_label
        result.servers = stack.server_versions()
        app_risks = config_risks(app_conf(stack.celery))
        sweep = Sweep(
            stack,
            probe,
            progress,
            burst_n=burst_n,
            load_s=load_s,
            rate_per_s=rate_per_s,
            budget_s=budget_s,
        )
        trials = sweep.run(configs)
        rec = recommend(trials, slo_ms=slo_ms, baseline=baseline)
        best = rec.config
        rec = verified(sweep, rec, baseline, repeat=repeat, result=result, rng=random.Random(seed))
    _record(
        result,
        trials,
        rec,
        slo_ms=slo_ms,
        baseline=baseline,
        app_risks=app_risks,
        swept_best=best,
    )
    _print_tune(result, rec, console)
    if write is not None and rec.config is not None:
        comment = (
            f"workload {task or workload}; {rec.reasons[0]}\n"
            f"measured by tasklab tune, run {result.run_id}"
        )
        path = write_config(write, rec.config, comment=comment)
        result.params["written_to"] = str(path)
        console.print(f"recommended settings written to {path}", highlight=False)
    return finish(result, settings, targets=slos, console=console)


def _with_baseline_first(grid: list[WorkerConfig], baseline: WorkerConfig) -> list[WorkerConfig]:
    return [baseline, *(c for c in grid if c != baseline)]


def _analyse(settings: Settings, app_spec: str | None, result: LabResult) -> None:
    result.add_figures("system", analyse_system())
    app = running_broker_app(settings, app_spec)
    rows: list[dict[str, Any]] = []
    risks: list[Risk] = []
    if app is not None:
        try:
            rows, risks = analyse_workers(app)
        finally:
            if app_spec is None:
                app.close()
    if not rows:
        result.notes.append("no running workers answered; analysed the configuration only")
    result.tables["workers"] = rows
    result.tables["risks"] = [r.to_dict() for r in risks]
    result.add_figures("workers", {"running": len(rows)})


def _record(
    result: LabResult,
    trials: Sequence[Trial],
    rec: Recommendation,
    *,
    slo_ms: float,
    baseline: WorkerConfig,
    app_risks: list[Risk],
    swept_best: WorkerConfig | None = None,
) -> None:
    long_s = max((t.run_ms_p50 for t in trials if t.status == "measured"), default=0) / 1e3
    if rec.config is not None:  # the measured run time says whether prefetch is a risk
        conf = {
            "worker_prefetch_multiplier": rec.config.prefetch_multiplier,
            "worker_max_tasks_per_child": 1,
        }
        app_risks += [
            r
            for r in config_risks(conf, where="recommendation", long_task_s=long_s)
            if r.setting == "worker_prefetch_multiplier"
        ]
    result.tables["risks"] = [*(r.to_dict() for r in app_risks), *result.tables.get("risks", [])]
    result.tables["trials"] = [t.row(slo_ms) for t in trials]
    result.tables["recommendation"] = [
        {
            **(rec.config.as_dict() if rec.config else {}),
            "meets_slo": rec.meets_slo,
            "reasons": rec.reasons,
        }
    ]
    measured = [t for t in trials if t.status == "measured"]
    best = next((t for t in measured if (rec.config or swept_best) == t.config), None)
    base = next((t for t in measured if t.config == baseline), None)
    figures: dict[str, float] = {
        "trials_measured": len(measured),
        "trials_skipped": len(trials) - len(measured),
        "risks": len(result.tables["risks"]),
    }
    if best is not None:
        figures.update(
            best_throughput_per_s=best.throughput_per_s, best_queue_wait_ms_p95=best.latency_ms_p95
        )
    if base is not None:
        figures["baseline_throughput_per_s"] = base.throughput_per_s
        if best is not None and base.throughput_per_s:
            figures["gain_pct"] = (best.throughput_per_s / base.throughput_per_s - 1) * 100
    result.add_figures("tune", figures)
    result.notes += rec.reasons


def _print_tune(result: LabResult, rec: Recommendation, console: Console) -> None:
    table = Table(title="tasklab tune: trials")
    columns = {
        "pool": "pool",
        "concurrency": "conc.",
        "prefetch_multiplier": "prefetch",
        "status": "status",
        "throughput_per_s": "tasks/s",
        "queue_wait_ms_p95": "P95 wait ms",
        "meets_slo": "SLO",
    }
    for header in columns.values():
        table.add_column(header, justify="right")
    for row in result.tables["trials"]:
        best = rec.config is not None and rec.config.as_dict() == {
            k: row[k] for k in ("pool", "concurrency", "prefetch_multiplier", "nodes")
        }
        style = "bold green" if best else None
        table.add_row(*(str(row[c]) for c in columns), style=style)
    console.print(table)
    for risk in result.tables.get("risks", []):
        console.print(
            f"[yellow]risk[/] {risk['where']}: {risk['setting']}: {risk['message']}",
            highlight=False,
        )
