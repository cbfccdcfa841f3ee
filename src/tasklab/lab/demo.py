"""``tasklab demo`` (what ``make demo`` runs): a short tour of the lab on embedded defaults.

Each phase starts what it needs (an embedded Redis, a scratch SQLite, worker processes, and
for the load test the seeded reference service: API and workers) and stops it all:

1. ``stress fast`` — 1,000 durable no-op jobs at once;
2. ``bench overhead`` — the same sleep workload through raw asyncio, raw Celery and tasklab;
3. ``drill kill`` and ``drill outage`` — a worker SIGKILLed mid-task, the broker stopped for
   a few seconds during submissions: nothing lost, nothing done twice;
4. ``drill soak`` (short) — jobs offered above capacity for half a minute with the production
   defaults, while a worker node, a submitting process and the broker die and jobs are
   cancelled: the ledger, and every job whose carrier died back within its bound;
5. ``load`` — Locust against the reference service, then its invariants.

Then one SLO table over every phase, and ``<home>/report/index.html`` (``tasklab report``).
A phase that fails is reported and the tour goes on. The demo fails (exit 1) when a phase
could not run or data was lost or corrupted; a missed speed target is shown, not fatal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from tasklab.errors import TasklabError
from tasklab.lab.bench import BenchSizes, run_bench
from tasklab.lab.capacity import OpenLoadSizes, run_open_load
from tasklab.lab.drill import CORRECTNESS, DrillSizes, run_drill
from tasklab.lab.load import LoadSizes, run_load
from tasklab.lab.progress import log_to_file
from tasklab.lab.report import run_report
from tasklab.lab.results import LabResult, format_value, results_table, write_result
from tasklab.lab.shop import ShopSizes
from tasklab.lab.soak import SoakSizes
from tasklab.lab.stress import StressSizes, run_stress
from tasklab.settings import Settings

# Load figures that mean lost or corrupted data, like the drills' CORRECTNESS figures.
_CORRECTNESS = (*CORRECTNESS, "orders_lost")
# Figures without a target that the demo's table shows too, per command.
HEADLINES = {
    "stress": ("fast.e2e_ms_p95",),
    "bench": (
        "overhead.celery_overhead_pct",
        "overhead.jobs_overhead_pct",
        "overhead.jobs_vs_celery_overhead_pct",
    ),
    "drill": (
        "kill.interrupted",
        "kill.retried",
        "outage.waiting_at_outage",
        "outage.via_local",
        "soak.offered_per_s",
        "soak.capacity_per_s",
        "soak.carried",
        "soak.carrier_latency_s_max",
    ),
    "load": (
        "order.latency_ms_p99",
        "points.latency_ms_p99",
    ),
    "load_capacity": ("capacity.knee_latency_ms_p99", "capacity.knee_settled_per_s"),
}

logger = logging.getLogger("tasklab.lab.demo")


@dataclass(frozen=True)
class DemoSizes:
    stress: StressSizes = field(default_factory=lambda: StressSizes(fast_n=1000))
    bench: BenchSizes = field(default_factory=lambda: BenchSizes(overhead_n=200))
    drill: DrillSizes = field(default_factory=lambda: DrillSizes(kill_jobs=24, kills=2))
    soak: SoakSizes = field(default_factory=SoakSizes.short)
    load: LoadSizes = field(default_factory=lambda: LoadSizes(users=20, duration_s=20.0))
    # The orders endpoint's knee: short steps (4 s counted each) rising by half each time.
    capacity: OpenLoadSizes = field(
        default_factory=lambda: OpenLoadSizes(
            duration_s=4.0, start_rate_per_s=25.0, step_factor=1.5, max_steps=8
        )
    )

    @classmethod
    def tiny(cls) -> DemoSizes:
        """A smoke run (tests): every phase, a few seconds each."""
        return cls(
            stress=replace(StressSizes.tiny(), fast_n=40),
            bench=replace(BenchSizes.tiny(), overhead_n=20),
            drill=DrillSizes.tiny(),
            soak=SoakSizes.tiny(),
            load=replace(LoadSizes.tiny(), shop=ShopSizes(users=6, products=4)),
            capacity=OpenLoadSizes.tiny(),
        )


@dataclass
class Phase:
    name: str
    run: Callable[[], LabResult]
    result: LabResult | None = None
    error: str | None = None
    duration_s: float = 0.0
    retried: str | None = None  # the connection error of a first attempt that was re-run


@dataclass
class DemoOutcome:
    phases: list[Phase]
    report: Path | None
    duration_s: float
    result: LabResult  # the demo's own envelope: phase times, every check

    @property
    def broken(self) -> list[str]:
        """Phases that did not run, and checks that mean lost or corrupted data."""
        out = [f"{p.name}: {p.error}" for p in self.phases if p.error]
        out += [
            c.figure
            for c in self.result.slos
            if c.passed is False and c.figure.rsplit(".", 1)[-1] in _CORRECTNESS
        ]
        return out

    @property
    def ok(self) -> bool:
        return not self.broken


def embedded(settings: Settings) -> Settings:
    """The demo runs on embedded servers only: never on a configured broker or database."""
    return settings.model_copy(
        update={"redis_url": None, "broker_url": None, "database_url": None, "result_backend": None}
    )


def _console_address(console: Console | None) -> Callable[[str, Path], None] | None:
    if console is None:
        return None

    def say(api_url: str, tokens: Path) -> None:
        console.print(
            f"  the jobs console of this phase's stack, while it runs: {api_url}/console "
            f"(log in with the admin token in {tokens})",
            highlight=False,
        )

    return say


def phases(settings: Settings, sizes: DemoSizes, console: Console | None = None) -> list[Phase]:
    quiet = Console(quiet=True)  # each phase's own tables stay in its JSON; one table at the end
    return [
        Phase(
            "stress fast",
            lambda: run_stress(settings, scenarios=["fast"], sizes=sizes.stress, console=quiet),
        ),
        Phase(
            "bench overhead",
            lambda: run_bench(settings, dimensions=["overhead"], sizes=sizes.bench, console=quiet),
        ),
        Phase(
            "drill kill + outage",
            lambda: run_drill(
                settings, scenarios=["kill", "outage"], sizes=sizes.drill, console=quiet
            ),
        ),
        Phase(
            "drill soak",
            lambda: run_drill(
                settings,
                scenarios=["soak"],
                sizes=replace(sizes.drill, soak=sizes.soak),
                console=quiet,
            ),
        ),
        Phase(
            "load",
            lambda: run_load(
                settings, sizes=sizes.load, console=quiet, on_service=_console_address(console)
            ),
        ),
        Phase(
            "load capacity",
            lambda: run_open_load(
                settings, sizes=sizes.capacity, find_capacity=True, console=quiet
            ),
        ),
    ]


def run_demo(
    settings: Settings,
    *,
    tasks: int | None = None,
    console: Console,
    sizes: DemoSizes | None = None,
) -> DemoOutcome:
    """Run every phase, print one SLO table, write the report; never raises for a phase."""
    sizes = sizes or DemoSizes()
    if tasks is not None:
        sizes = replace(sizes, stress=replace(sizes.stress, fast_n=tasks))
    if any((settings.redis_url, settings.broker_url, settings.database_url)):
        console.print("[dim]demo: runs on embedded servers; the configured ones are not used[/]")
    settings = embedded(settings)
    result = LabResult("demo")  # now: its start time and the machine's load before the tour
    started = result.started_at
    tour = phases(settings, sizes, console)
    console.print(
        f"[bold]tasklab demo[/] — {len(tour)} phases on embedded defaults, results in "
        f"{settings.results_dir}",
        highlight=False,
    )
    with log_to_file(settings.home_dir / "lab" / "logs" / f"demo-{result.run_id}.log"):
        for n, phase in enumerate(tour, 1):
            _run_phase(phase, f"[{n}/{len(tour)}]", console)
    _fill(result, tour)
    report = _report(settings, [p.result for p in tour if p.result], result, console)
    write_result(result, settings)
    outcome = DemoOutcome(tour, report, time.time() - started, result)
    _print_summary(outcome, console)
    return outcome


def _run_phase(phase: Phase, label: str, console: Console) -> None:
    began = time.monotonic()
    with console.status(f"{label} {phase.name} …"):
        for attempt in (1, 2):
            phase.error = None
            try:
                phase.result = phase.run()
            except TasklabError as e:
                phase.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            except Exception as e:  # a tour goes on; the failure is reported and fails the demo
                phase.error = f"{type(e).__name__}: {e}"
                logger.exception("demo phase %r failed (attempt %d)", phase.name, attempt)
                # A connection dropped under a busy machine: each phase starts its servers
                # afresh, so one clean re-run tells a hiccup from a fault (which fails twice).
                if attempt == 1 and _is_connection_error(e):
                    phase.retried = phase.error
                    continue
            break
    phase.duration_s = time.monotonic() - began
    if phase.error:
        verdict = f"[bold red]did not run[/]: {phase.error}"
    else:
        assert phase.result is not None
        missed = sum(1 for c in phase.result.slos if c.passed is False)
        verdict = "[green]all targets met[/]" if not missed else f"[yellow]{missed} missed[/]"
    console.print(f"{label} {phase.name}: {phase.duration_s:.0f} s, {verdict}", highlight=False)


def _is_connection_error(e: BaseException) -> bool:
    import kombu.exceptions
    import redis

    return isinstance(e, redis.ConnectionError | kombu.exceptions.OperationalError | OSError)


def _fill(result: LabResult, tour: list[Phase]) -> None:
    """The demo's envelope: phase times (``phase.*``), and every phase's checks and headline
    figures named ``<command>.<figure>``."""
    result.params["phases"] = [
        {"phase": p.name, "result": str(p.result.path) if p.result else None, "error": p.error}
        for p in tour
    ]
    for p in tour:
        result.figures[f"phase.{_key(p.name)}_s"] = p.duration_s
        if p.retried:
            result.notes.append(f"{p.name}: re-run once after a connection error: {p.retried}")
        if p.result is not None:
            _fold(result, p.result)
    result.finished_at = time.time()
    result.figures["phase.total_s"] = result.finished_at - result.started_at


def _fold(demo: LabResult, part: LabResult) -> None:
    checked = {c.figure: c for c in part.slos}
    # Two load phases: the open-loop capacity search is named apart from Locust's.
    prefix = "load_capacity" if part.params.get("mode") == "find-capacity" else part.command
    wanted = [*checked, *(f for f in HEADLINES.get(prefix, ()) if f not in checked)]
    for figure in wanted:
        name = f"{prefix}.{figure}"
        if figure in part.figures:
            demo.figures[name] = part.figures[figure]
        if figure in checked:
            demo.slos.append(replace(checked[figure], figure=name))


def _key(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_")


def _report(
    settings: Settings, results: list[LabResult], demo: LabResult, console: Console
) -> Path | None:
    paths = [r.path for r in results if r.path is not None]
    if not paths:
        return None
    quiet = Console(quiet=True)
    try:
        return run_report(settings, paths=paths, console=quiet)
    except TasklabError as e:
        demo.notes.append(f"report: {e}")
        console.print(f"[bold red]report not written[/]: {e}", highlight=False)
        return None


def _print_summary(outcome: DemoOutcome, console: Console) -> None:
    result = outcome.result
    slos = [c.to_dict() for c in result.slos]
    figures = {k: v for k, v in result.figures.items() if not k.startswith("phase.")}
    console.print(results_table(figures, slos, title="tasklab demo: service levels"))
    missed = [c for c in result.slos if c.passed is False]
    console.print(
        f"demo finished in {format_value(outcome.duration_s)} s; "
        f"{len(result.slos) - len(missed)} of {len(result.slos)} targets met",
        highlight=False,
    )
    if outcome.report is not None:
        console.print(f"report: {outcome.report}", highlight=False)
    for line in outcome.broken:
        console.print(f"[bold red]broken:[/] {line}", highlight=False)
