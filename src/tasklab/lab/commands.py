"""The lab's CLI commands (registered on ``tasklab`` by tasklab.cli): thin wrappers over
run_stress / run_bench / run_tune / run_report / run_drill / run_load."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tasklab.settings import Settings


class TaskBody(enum.StrEnum):
    counted = "counted"
    noop = "noop"


console = Console()


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings)
    return settings


TargetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target", "--slo", help="Change a threshold: NAME=VALUE, or NAME<=VALUE (<, >, >=, ==)."
    ),
]
AppOpt = Annotated[
    str | None,
    typer.Option(
        "--app", help="Your Celery app, module:attribute (its workers import tasklab.lab.probes)."
    ),
]
ExternalOpt = Annotated[
    bool,
    typer.Option(
        "--external-workers", help="Use the workers already running instead of starting some."
    ),
]
PoolOpt = Annotated[str | None, typer.Option(help="Worker pool: prefork, threads or solo.")]
ConcOpt = Annotated[int | None, typer.Option(min=1, help="Worker concurrency.")]
PrefetchOpt = Annotated[
    int | None, typer.Option("--prefetch", min=1, help="Worker prefetch multiplier.")
]
NodesOpt = Annotated[
    int,
    typer.Option(
        "--nodes", min=1, max=64, help="Worker processes to start (e.g. 2 solo nodes on 2 cores)."
    ),
]


def stress(
    ctx: typer.Context,
    scenario: Annotated[
        list[str] | None, typer.Option(help="fast, long, priority, failures, leak (repeatable).")
    ] = None,
    all_scenarios: Annotated[bool, typer.Option("--all")] = False,
    via: Annotated[str | None, typer.Option(help="jobs (durable) or celery (plain).")] = None,
    tasks: Annotated[int | None, typer.Option(min=1, help="Tasks of the fast scenario.")] = None,
    repeat: Annotated[
        int, typer.Option(min=1, max=50, help="Trials of each scenario, interleaved.")
    ] = 3,
    target: TargetOpt = None,
    app_spec: AppOpt = None,
    external_workers: ExternalOpt = False,
    pool: PoolOpt = None,
    concurrency: ConcOpt = None,
    prefetch: PrefetchOpt = None,
) -> None:
    """Load the stack with a scenario; check throughput, latency, outcomes and the ledger."""
    from dataclasses import replace

    from tasklab.lab.harness import worker_config
    from tasklab.lab.stress import SCENARIOS, StressSizes, run_stress

    settings = _settings(ctx)
    sizes = StressSizes() if tasks is None else replace(StressSizes(), fast_n=tasks)
    result = run_stress(
        settings,
        scenarios=SCENARIOS if all_scenarios else (scenario or ["fast"]),
        sizes=sizes,
        app_spec=app_spec,
        via=via,
        external_workers=external_workers,
        targets=target or [],
        worker=worker_config(
            settings, pool=pool, concurrency=concurrency, prefetch_multiplier=prefetch
        ),
        console=console,
        repeat=repeat,
    )
    raise typer.Exit(0 if result.passed else 1)


def bench(
    ctx: typer.Context,
    dimension: Annotated[
        list[str] | None,
        typer.Option(
            help="submit, concurrent, overhead, execute, memory, queue, jobs, cache "
            "(repeatable; default all)."
        ),
    ] = None,
    tasks: Annotated[
        int | None,
        typer.Option(min=1, help="Tasks per trial of `jobs` (default: sized by a pilot for 12 s)."),
    ] = None,
    task_body: Annotated[
        TaskBody,
        typer.Option(help="`jobs`' task: counted (the peer harness's Redis round trip) or noop."),
    ] = TaskBody.counted,
    submitters: Annotated[int, typer.Option(min=1, help="Threads submitting in `jobs`.")] = 4,
    repeat: Annotated[
        int,
        typer.Option(min=1, max=50, help="Trials of each dimension (rounds of `jobs`), shuffled."),
    ] = 3,
    target: TargetOpt = None,
    app_spec: AppOpt = None,
    external_workers: ExternalOpt = False,
    pool: PoolOpt = None,
    concurrency: ConcOpt = None,
    prefetch: PrefetchOpt = None,
    nodes: NodesOpt = 1,
) -> None:
    """Benchmarks: submit latency, concurrent submitters, overhead, worker throughput, memory,
    broker rates, raw Celery vs tasklab jobs, the cache."""
    from dataclasses import replace

    from tasklab.lab.bench import DIMENSIONS, BenchSizes, configured_brokers, run_bench
    from tasklab.lab.harness import worker_config

    settings = _settings(ctx)
    sizes = replace(
        BenchSizes(), jobs_submitters=submitters, repeat=repeat, jobs_body=task_body.value
    )
    if tasks:
        sizes = replace(sizes, jobs_n=tasks, jobs_window_s=0)
    result = run_bench(
        settings,
        dimensions=dimension or DIMENSIONS,
        sizes=sizes,
        app_spec=app_spec,
        external_workers=external_workers,
        brokers=configured_brokers(settings, dict(os.environ)),
        worker=worker_config(
            settings,
            pool=pool,
            concurrency=concurrency,
            prefetch_multiplier=prefetch,
            nodes=nodes,
        ),
        targets=target or [],
        console=console,
    )
    raise typer.Exit(0 if result.passed else 1)


def tune(
    ctx: typer.Context,
    dimension: Annotated[
        str,
        typer.Option(
            help="celery (raw Celery tasks) or jobs (durable jobs, bundle_max among the knobs)."
        ),
    ] = "celery",
    workload: Annotated[
        str | None,
        typer.Option(help="cpu, io or mixed probe (default mixed); jobs: noop or io (noop)."),
    ] = None,
    task: Annotated[str | None, typer.Option(help="A named task to measure instead.")] = None,
    args: Annotated[str | None, typer.Option("--args", help="Its arguments, a JSON list.")] = None,
    pools: Annotated[str | None, typer.Option(help="e.g. prefork,threads")] = None,
    concurrency: Annotated[str | None, typer.Option(help="e.g. 2,4,8")] = None,
    prefetch: Annotated[str | None, typer.Option(help="e.g. 1,4")] = None,
    bundle_max: Annotated[
        str | None, typer.Option("--bundle-max", help="jobs only: e.g. 1,16,64")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(min=1, help="Seconds for the sweep (60; jobs: 120).")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(min=1, help="Tasks per trial's burst (100; jobs: 500).")
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Steady-load tasks/s for queue wait.")] = None,
    write: Annotated[
        Path | None, typer.Option(help="Write the recommendation: *.env or *.py.")
    ] = None,
    repeat: Annotated[
        int,
        typer.Option(
            min=0,
            max=50,
            help="Rounds re-measuring the recommendation against the current "
            "settings (0: not verified).",
        ),
    ] = 3,
    target: TargetOpt = None,
    app_spec: AppOpt = None,
) -> None:
    """Analyse system, workers and Celery config; sweep pool x concurrency x prefetch (and
    bundle_max for the jobs path); recommend, once verified against the current settings."""
    from tasklab.lab.errors import LabError
    from tasklab.lab.harness import WorkerConfig
    from tasklab.lab.tune import parse_grid, parse_task_args, run_tune
    from tasklab.lab.tune_jobs import check_dimension, parse_jobs_grid

    settings = _settings(ctx)
    grid: list[WorkerConfig]
    if check_dimension(dimension) == "jobs":
        grid = list(
            parse_jobs_grid(
                settings,
                pools=pools,
                concurrencies=concurrency,
                prefetches=prefetch,
                bundles=bundle_max,
            )
        )
    elif bundle_max is not None:
        raise LabError("--bundle-max applies to the jobs path: add --dimension jobs")
    else:
        grid = parse_grid(pools=pools, concurrencies=concurrency, prefetches=prefetch)
    if rate is not None and rate <= 0:
        raise LabError(f"--rate {rate:g}: tasks/s must be above 0")
    run_tune(
        settings,
        dimension=dimension,
        workload=workload,
        task=task,
        task_args=parse_task_args(args),
        app_spec=app_spec,
        grid=grid,
        budget_s=budget,
        burst_n=burst,
        rate_per_s=rate,
        write=write,
        targets=target or [],
        console=console,
        repeat=repeat,
    )


def report(
    ctx: typer.Context,
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Result JSON files (default: the newest of each command)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Default .tasklab/report/index.html")] = None,
    compare: Annotated[Path | None, typer.Option(help="An older result to compare with.")] = None,
    tolerance: Annotated[float, typer.Option(min=0, help="Regression tolerance, %.")] = 10.0,
) -> None:
    """One self-contained HTML page from lab results; --compare marks regressions."""
    from tasklab.lab.report import regressions, run_report

    settings = _settings(ctx)
    run_report(
        settings,
        paths=files or [],
        out=out,
        compare=compare,
        tolerance_pct=tolerance,
        console=console,
    )
    if compare is not None and regressions(files or [], compare, tolerance):
        raise typer.Exit(1)


def drill(
    ctx: typer.Context,
    scenario: Annotated[
        list[str] | None,
        typer.Argument(help="kill, outage, flush, api, soak, partition (one or more)."),
    ] = None,
    all_drills: Annotated[
        bool,
        typer.Option("--all", help="Every drill, in turn (partition only on PostgreSQL)."),
    ] = False,
    jobs: Annotated[int | None, typer.Option(min=1, help="Jobs of the kill drill.")] = None,
    kills: Annotated[int | None, typer.Option(min=1, help="Workers SIGKILLed (kill).")] = None,
    outage: Annotated[
        float | None, typer.Option(min=0.5, help="Seconds the broker is down (outage).")
    ] = None,
    lease: Annotated[
        float, typer.Option("--lease-s", min=1, help="Job lease, s (not the soak's).")
    ] = 3.0,
    requeue_after: Annotated[
        float,
        typer.Option("--requeue-after-s", min=1, help="Reaper re-queue age, s (not the soak's)."),
    ] = 3.0,
    short: Annotated[
        bool,
        typer.Option(
            "--short", help="The short soak (30 s of offer instead of 240) and partition."
        ),
    ] = False,
    offer: Annotated[
        float | None,
        typer.Option("--offer-s", min=5, help="Seconds the soak offers jobs (open loop)."),
    ] = None,
    fault: Annotated[
        str | None,
        typer.Option(
            help="How outage and api take the broker away: stop (the lab's own Redis), or "
            "through a proxy on any broker: outage, blackhole, slow. Default: stop, or "
            "outage when a broker URL is set."
        ),
    ] = None,
    delay_ms: Annotated[
        float, typer.Option("--delay-ms", min=0, help="A slow link's delay per chunk, ms.")
    ] = 200.0,
    target: TargetOpt = None,
) -> None:
    """Break the stack on purpose (SIGKILLed workers, broker outage or flush, a killed API);
    prove that nothing was lost or done twice, and time the recovery. `soak` does it all at
    once under sustained overload, with the production defaults (no recovery knob tuned)."""
    from dataclasses import replace

    from tasklab.lab.drill import DRILLS, DrillSizes, RecoveryKnobs, run_drill
    from tasklab.lab.partition import PARTITION, PartitionSizes
    from tasklab.lab.soak import SoakSizes

    base = DrillSizes()
    soak = SoakSizes.short() if short else SoakSizes()
    if offer is not None:
        soak = replace(soak, offer_s=offer)
    sizes = replace(
        base,
        kill_jobs=jobs or base.kill_jobs,
        kills=kills or base.kills,
        outage_s=outage or base.outage_s,
        soak=soak,
        partition=PartitionSizes.short() if short else PartitionSizes(),
    )
    settings = _settings(ctx)
    every = [d for d in DRILLS if d != PARTITION or settings.database_url is not None]
    result = run_drill(
        settings,
        scenarios=every if all_drills else (scenario or ["kill"]),
        sizes=sizes,
        knobs=RecoveryKnobs(lease_s=lease, requeue_after_s=requeue_after),
        targets=target or [],
        console=console,
        fault=fault,
        delay_ms=delay_ms,
    )
    raise typer.Exit(0 if result.passed else 1)


def load(
    ctx: typer.Context,
    users: Annotated[int, typer.Option(min=1, max=10_000, help="Concurrent Locust users.")] = 20,
    spawn_rate: Annotated[float, typer.Option(min=0.1, help="Users started per second.")] = 10.0,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration", min=1, max=3600, help="Seconds of load (20; open loop: 10 a step)."
        ),
    ] = None,
    user_class: Annotated[
        list[str] | None,
        typer.Option(
            "--user-class",
            help="shop, orders, points, sync (repeatable; default shop, orders, sync).",
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running service instead of the lab's own.")
    ] = None,
    tokens: Annotated[
        Path | None, typer.Option(help="Its users: the JSON lines `tasklab seed` wrote.")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate", min=0.1, help="Open loop: requests/s on a fixed schedule (not users)."
        ),
    ] = None,
    find_capacity: Annotated[
        bool,
        typer.Option(
            "--find-capacity",
            help="Open loop, rising rate: the highest rate within the SLO with the workers "
            "keeping up.",
        ),
    ] = False,
    endpoint: Annotated[str, typer.Option(help="Open loop: orders or points.")] = "orders",
    slo_p99_ms: Annotated[
        float, typer.Option("--slo-p99-ms", min=1, help="Open loop: the P99 a step must keep.")
    ] = 500.0,
    start_rate: Annotated[
        float, typer.Option("--start-rate", min=0.1, help="--find-capacity: the first step.")
    ] = 25.0,
    step_factor: Annotated[
        float, typer.Option("--step-factor", min=1.05, help="--find-capacity: rate x per step.")
    ] = 1.5,
    max_steps: Annotated[
        int, typer.Option("--max-steps", min=1, max=50, help="--find-capacity: at most.")
    ] = 12,
    target: TargetOpt = None,
) -> None:
    """Locust, headless, against the reference service (seeded, with its API and workers, or
    --url): RPS, P50/P95/P99 and failures by reason per endpoint, then the invariants.
    With --rate or --find-capacity: an open-loop load instead (latency from each request's
    due time, the workers' backlog, the capacity knee)."""
    from dataclasses import replace

    from tasklab.lab.load import DEFAULT_CLASSES, LoadSizes, run_load

    if rate is not None or find_capacity:
        from tasklab.lab.capacity import OpenLoadSizes, run_open_load

        open_sizes = OpenLoadSizes(
            rate_per_s=rate or OpenLoadSizes().rate_per_s,
            duration_s=duration or OpenLoadSizes().duration_s,
            endpoint=endpoint,
            slo_p99_ms=slo_p99_ms,
            start_rate_per_s=start_rate,
            step_factor=step_factor,
            max_steps=max_steps,
        )
        result = run_open_load(
            _settings(ctx),
            sizes=open_sizes,
            find_capacity=find_capacity,
            url=url,
            tokens=tokens,
            targets=target or [],
            console=console,
        )
        raise typer.Exit(0 if result.passed else 1)
    sizes = replace(LoadSizes(), users=users, spawn_rate=spawn_rate, duration_s=duration or 20.0)
    result = run_load(
        _settings(ctx),
        sizes=sizes,
        classes=user_class or list(DEFAULT_CLASSES),
        url=url,
        tokens=tokens,
        targets=target or [],
        console=console,
    )
    raise typer.Exit(0 if result.passed else 1)
