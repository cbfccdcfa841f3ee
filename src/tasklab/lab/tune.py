"""``tasklab tune``: look at the system, the running workers and the Celery config, then measure
worker configurations and recommend one.

1. **Analyse**: cores, memory and load; every running worker's ``inspect stats``/``conf``
   (pool, concurrency, prefetch, tasks processed, rusage); risky Celery settings (see
   ``config_risks``): tasklab.lab.tune_analysis.
2. **Measure**: sweep pool x concurrency x prefetch on a probe workload (``cpu``, ``io``,
   ``mixed``) or a named task, each configuration on its own worker and queue, within a time
   budget. A trial has two phases: a burst of ``burst_n`` tasks (throughput: how fast the
   configuration drains work), then ``load_s`` seconds of tasks arriving at a steady rate, the
   same for every trial (latency: P95 queue wait at that load): tasklab.lab.tune_sweep.
3. **Recommend** the configuration with the best throughput whose P95 queue wait meets the SLO,
   with the comparisons that justify it; ``write_config`` writes it as an env file or a Celery
   config module: tasklab.lab.tune_recommend.
4. **Verify** the recommendation against the current settings: tasklab.lab.tune_verify.

This module is the command: it runs the steps in one stack and records the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.progress import lab_progress
from tasklab.lab.results import LabResult, Target, finish, resolve_targets
from tasklab.lab.tune_analysis import (
    Risk,
    analyse_system,
    analyse_workers,
    app_conf,
    config_risks,
    running_broker_app,
)
from tasklab.lab.tune_recommend import Recommendation, recommend, write_config
from tasklab.lab.tune_sweep import (
    Sweep,
    Trial,
    default_grid,
    parse_grid,
    parse_task_args,
    workload_probe,
)
from tasklab.settings import Settings

# The steps live in their own modules; these names stay importable from here.
__all__ = [
    "DEFAULT_SLO_MS",
    "DEFAULT_TARGETS",
    "Recommendation",
    "Risk",
    "Sweep",
    "Trial",
    "analyse_system",
    "analyse_workers",
    "app_conf",
    "config_risks",
    "default_grid",
    "parse_grid",
    "parse_task_args",
    "recommend",
    "run_tune",
    "workload_probe",
    "write_config",
]

DEFAULT_SLO_MS = 100.0  # seed: P95 < 100 ms
DEFAULT_TARGETS = (Target("tune.best_queue_wait_ms_p95", "<=", DEFAULT_SLO_MS),)


def run_tune(
    settings: Settings,
    *,
    workload: str | None = None,
    task: str | None = None,
    task_args: Sequence[Any] = (),
    app_spec: str | None = None,
    grid: Sequence[WorkerConfig] | None = None,
    burst_n: int | None = None,
    load_s: float = 2.0,
    rate_per_s: float | None = None,
    budget_s: float | None = None,
    write: Path | None = None,
    targets: Sequence[str] = (),
    console: Console | None = None,
    repeat: int = 3,
    seed: int | None = None,
    dimension: str = "celery",
) -> LabResult:
    """Analyse, sweep, recommend, verify the recommendation against the current settings in
    ``repeat`` interleaved rounds (tasklab.lab.tune_verify); write the result (and ``write``
    the config if asked and verified). ``dimension``: ``celery`` (raw Celery tasks) or
    ``jobs`` (durable jobs, with ``bundle_max`` among the knobs: tasklab.lab.tune_jobs)."""
    import random

    from tasklab.lab import tune_jobs
    from tasklab.lab.tune_recommend import check_writable
    from tasklab.lab.tune_verify import verified

    console = console or Console()
    jobs = tune_jobs.check_dimension(dimension) == "jobs"
    if jobs and app_spec is not None:
        raise LabError("--dimension jobs needs tasklab's own stack; it cannot run with --app")
    sweep_type: type[Sweep] = tune_jobs.JobsSweep if jobs else Sweep
    baseline: WorkerConfig
    if jobs:
        workload = workload or tune_jobs.DEFAULT_JOBS_WORKLOAD
        probe = tune_jobs.jobs_probe(workload, task=task, args=task_args)
        baseline = tune_jobs.jobs_baseline(settings)
        burst_n = burst_n or tune_jobs.JOBS_BURST_N
        budget_s = tune_jobs.JOBS_BUDGET_S if budget_s is None else budget_s
        default: list[WorkerConfig] = list(tune_jobs.default_jobs_grid(settings))
    else:
        workload = workload or "mixed"
        probe = workload_probe(workload, task=task, args=task_args)
        baseline = WorkerConfig.from_settings(settings)
        burst_n = burst_n or 100
        budget_s = 60.0 if budget_s is None else budget_s
        default = default_grid()
    if write is not None:
        check_writable(write, baseline)
    slos = resolve_targets(DEFAULT_TARGETS, targets)
    slo_ms = next(
        (t.value for t in slos if t.applies_to("tune.best_queue_wait_ms_p95")), DEFAULT_SLO_MS
    )
    if jobs and grid is not None:  # a plain worker grid runs with the current bundle_max
        grid = [tune_jobs.as_jobs_config(c, settings) for c in grid]
    configs = _with_baseline_first(list(grid or default), baseline)
    result = LabResult(
        "tune",
        params={
            "dimension": dimension,
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
        sweep = sweep_type(
            stack,
            probe,
            progress,
            burst_n=burst_n,
            load_s=load_s,
            rate_per_s=rate_per_s,
            budget_s=budget_s,
        )
        try:
            trials = sweep.run(configs)
            rec = recommend(trials, slo_ms=slo_ms, baseline=baseline)
            best = rec.config
            rec = verified(
                sweep, rec, baseline, repeat=repeat, result=result, rng=random.Random(seed)
            )
        finally:
            sweep.close()
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
        **(
            {"bundle_max": "bundle"}
            if any("bundle_max" in r for r in result.tables["trials"])
            else {}
        ),
        "status": "status",
        "throughput_per_s": "tasks/s",
        "queue_wait_ms_p95": "P95 wait ms",
        "meets_slo": "SLO",
    }
    for header in columns.values():
        table.add_column(header, justify="right")
    for row in result.tables["trials"]:
        best = rec.config is not None and rec.config.as_dict() == {
            k: row.get(k) for k in rec.config.as_dict()
        }
        style = "bold green" if best else None
        table.add_row(*(str(row[c]) for c in columns), style=style)
    console.print(table)
    for risk in result.tables.get("risks", []):
        console.print(
            f"[yellow]risk[/] {risk['where']}: {risk['setting']}: {risk['message']}",
            highlight=False,
        )
