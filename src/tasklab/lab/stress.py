"""``tasklab stress``: scenarios that load the stack and check what came out.

- ``fast``: 1,000 no-op tasks submitted at once from a few threads;
- ``long``: 50 one-second tasks (with progress on tasklab jobs); none may run twice;
- ``priority``: short tasks with random priorities: how often a task starts while a
  higher-priority one submitted earlier is still waiting;
- ``failures``: a share of tasks raise (on tasklab jobs half of them once, half always):
  retries, dead letters and the final ledger;
- ``leak``: many no-ops in chunks, worker RSS after each chunk, a fitted slope.

On tasklab's own stack the tasks are durable jobs (``via="jobs"``); with ``--app`` (or
``via="celery"``) they are the plain Celery probes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import psutil
from rich.console import Console
from rich.progress import Progress

from tasklab.lab import summary
from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.ledger import take_ledger
from tasklab.lab.progress import Sampler, lab_progress, phase
from tasklab.lab.repeat import run_repeated
from tasklab.lab.results import LabResult, Series, Target, finish, resolve_targets
from tasklab.lab.workload import (
    CeleryDriver,
    Driver,
    JobsDriver,
    Probe,
    Sample,
    Ticket,
    submit_all,
)
from tasklab.settings import Settings

SCENARIOS = ("fast", "long", "priority", "failures", "leak")
SEED = 7
# Seed targets: > 100 tasks/s, success > 95 %, RSS growth < 50 MB; a burst's submit P95 (the
# caller's cost; the seed's P95 < 100 ms on what a task waits is `tasklab load --rate`'s
# open.queue_wait_ms_p95 and open.e2e_ms_p95, judged at a steady rate); the ledger invariants.
DEFAULT_TARGETS = (
    Target("fast.throughput_per_s", ">", 100.0),
    Target("fast.submit_ms_p95", "<", 100.0),
    Target("fast.success_pct", ">", 95.0),
    Target("long.success_pct", ">", 95.0),
    Target("long.redelivered", "==", 0.0),
    Target("priority.success_pct", ">", 95.0),
    Target("failures.outcome_match_pct", ">=", 100.0),
    Target("failures.ledger_lost", "==", 0.0),
    Target("failures.ledger_duplicate_effects", "==", 0.0),
    Target("leak.rss_growth_mb", "<", 50.0),
)


@dataclass(frozen=True)
class StressSizes:
    fast_n: int = 1000
    fast_submitters: int = 4
    long_n: int = 50
    long_s: float = 1.0
    priority_n: int = 200
    priority_task_s: float = 0.02
    failures_n: int = 200
    failures_share: float = 0.2
    leak_n: int = 3000
    leak_chunk: int = 250
    timeout_s: float = 120.0

    @classmethod
    def tiny(cls) -> StressSizes:
        return cls(
            fast_n=60,
            long_n=4,
            long_s=0.3,
            priority_n=30,
            priority_task_s=0.02,
            failures_n=20,
            failures_share=0.4,
            leak_n=60,
            leak_chunk=20,
            timeout_s=60,
        )


class Stress:
    def __init__(
        self,
        stack: LabStack,
        sizes: StressSizes,
        result: LabResult,
        progress: Progress,
        *,
        via: str,
    ) -> None:
        self.stack = stack
        self.sizes = sizes
        self.result = result
        self.progress = progress
        self.via = via
        self.rng = random.Random(SEED)

    def driver(self, batch: str) -> Driver:
        if self.via == "jobs":
            return JobsDriver(self.stack.jobs, owner=self.stack.owner(batch))
        return CeleryDriver(
            self.stack.celery, queue=self.stack.queue, priority_of=self.stack.priority
        )

    def sleep_probe(self, seconds: float, *, steps: int = 1) -> Probe:
        kwargs: dict[str, float] = {"seconds": seconds}
        if self.via == "jobs" and steps > 1:
            kwargs["steps"] = steps
        return Probe("sleep", kwargs)

    def measure(
        self,
        scenario: str,
        driver: Driver,
        probes: Sequence[Probe],
        *,
        priorities: Sequence[int | None] | None = None,
        submitters: int = 1,
    ) -> tuple[list[Ticket], list[Sample]]:
        """Submit, collect, and record the figures every scenario has."""
        cpu_before = self.stack.worker_cpu_s()
        psutil.cpu_percent(None)
        with Sampler(self.stack) as sampler, phase(self.progress, scenario, len(probes)) as update:
            tickets = submit_all(driver, probes, priorities=priorities, submitters=submitters)
            samples = driver.collect(tickets, timeout_s=self.sizes.timeout_s, progress=update)
        wall_s = max(
            1e-9,
            max((s.finished_at or s.sent_at) for s in samples) - min(s.sent_at for s in samples),
        )
        figures = summary.summarize(samples, tickets)
        figures["system_cpu_pct"] = psutil.cpu_percent(None)
        figures["worker_cpu_pct"] = 100 * (self.stack.worker_cpu_s() - cpu_before) / wall_s
        if sampler.rss_mb:
            figures["rss_start_mb"] = sampler.rss_mb[0][1]
            figures["rss_end_mb"] = sampler.rss_mb[-1][1]
        self.result.add_figures(scenario, figures)
        self.result.series += [
            summary.cdf_series(samples, chart="stress: end-to-end latency", label=scenario),
            Series(
                "stress: completions per second",
                scenario,
                "line",
                "seconds",
                "tasks/s",
                summary.completions_over_time(samples),
            ),
            *sampler.series(chart_prefix="stress", label=scenario),
        ]
        return tickets, samples

    # --- scenarios ----------------------------------------------------------------------------
    def fast(self) -> None:
        self.measure(
            "fast",
            self.driver("fast"),
            [Probe("noop")] * self.sizes.fast_n,
            submitters=self.sizes.fast_submitters,
        )

    def long(self) -> None:
        probe = self.sleep_probe(self.sizes.long_s, steps=5)
        _, samples = self.measure("long", self.driver("long"), [probe] * self.sizes.long_n)
        self.result.add_figures("long", {"redelivered": sum(1 for s in samples if s.attempts > 1)})

    def priority(self) -> None:
        n = self.sizes.priority_n
        priorities: list[int | None] = [self.rng.randint(0, 9) for _ in range(n)]
        probes = [self.sleep_probe(self.sizes.priority_task_s)] * n
        _, samples = self.measure(
            "priority", self.driver("priority"), probes, priorities=priorities
        )
        inversions, considered = summary.priority_inversions(samples)
        high = [s for s in samples if (s.priority or 0) >= 7]
        low = [s for s in samples if s.priority is not None and s.priority <= 2]
        self.result.add_figures(
            "priority",
            {
                "inversions": inversions,
                "inversion_pct": 100 * inversions / considered if considered else 0.0,
                **summary.percentiles_of(high, "queue_wait_ms", prefix="high_queue_wait_ms"),
                **summary.percentiles_of(low, "queue_wait_ms", prefix="low_queue_wait_ms"),
            },
        )

    def failures(self) -> None:
        probes = self._failure_mix()
        driver = self.driver("failures")
        tickets, samples = self.measure("failures", driver, probes)
        expected = {
            "ok": "succeeded",
            "flaky": "succeeded",
            "fatal": "dead" if self.via == "jobs" else "failed",
        }
        matched = sum(1 for s in samples if expected[s.label] == s.status)
        figures = {
            "outcome_match_pct": 100 * matched / len(samples) if samples else 0.0,
            "expected_failures": sum(1 for p in probes if p.label == "fatal"),
            "retried": sum(1 for s in samples if s.attempts > 1),
        }
        if isinstance(driver, JobsDriver):
            ledger = take_ledger(
                self.stack.jobs.engine, owner=driver.owner, submitted_ids=[t.id for t in tickets]
            )
            figures.update(ledger.figures())
            figures["ledger_balanced"] = float(ledger.balanced)
            self.result.tables["ledger.failures"] = [ledger.to_dict()]
        else:
            figures["ledger_lost"] = sum(1 for s in samples if s.status == "lost")
        self.result.add_figures("failures", figures)

    def _failure_mix(self) -> list[Probe]:
        n = self.sizes.failures_n
        failing = round(n * self.sizes.failures_share)
        if self.via == "jobs":
            flaky = failing // 2
            probes = (
                [Probe("effect", {"fail_first": 1}, label="flaky")] * flaky
                + [Probe("fail", label="fatal")] * (failing - flaky)
                + [Probe("effect", label="ok")] * (n - failing)
            )
        else:
            probes = [Probe("fail", label="fatal")] * failing + [Probe("noop", label="ok")] * (
                n - failing
            )
        self.rng.shuffle(probes)
        return probes

    def leak(self) -> None:
        """Chunks of no-ops; after each, the workers' RSS against tasks done so far."""
        n, chunk = self.sizes.leak_n, max(1, self.sizes.leak_chunk)
        driver = self.driver("leak")
        points: list[tuple[float, float]] = [(0.0, self.stack.worker_rss_mb())]
        all_samples: list[Sample] = []
        with phase(self.progress, "leak", n) as update:
            while len(all_samples) < n:
                size = min(chunk, n - len(all_samples))
                tickets = submit_all(driver, [Probe("noop")] * size)
                all_samples += driver.collect(
                    tickets,
                    timeout_s=self.sizes.timeout_s,
                    progress=_offset(update, len(all_samples)),
                )
                points.append((float(len(all_samples)), self.stack.worker_rss_mb()))
        self.result.add_figures("leak", self._leak_figures(points, all_samples))
        self.result.series.append(
            Series(
                "stress leak: worker RSS by tasks done",
                "leak",
                "line",
                "tasks done",
                "MB",
                points,
                y_from_zero=False,
            )
        )

    def _leak_figures(
        self, points: list[tuple[float, float]], samples: Sequence[Sample]
    ) -> dict[str, float]:
        fit = points[1:] if len(points) > 3 else points  # the first chunk warms caches up
        slope_per_task, _ = summary.linear_fit([p[0] for p in fit], [p[1] for p in fit])
        total = points[-1][0]
        return {
            **summary.outcome_figures(samples),
            "rss_start_mb": points[0][1],
            "rss_end_mb": points[-1][1],
            "rss_slope_mb_per_1000": slope_per_task * 1000,
            "rss_growth_mb": slope_per_task * total,
            "leak_flagged": float(slope_per_task * total >= 50.0),
        }


def flag_leak(result: LabResult, targets: Sequence[Target]) -> None:
    """``leak.leak_flagged`` by the RSS-growth target in force (a --target moves it)."""
    growth = result.figures.get("leak.rss_growth_mb")
    if growth is None:
        return
    for target in targets:
        if target.applies_to("leak.rss_growth_mb"):
            result.figures["leak.leak_flagged"] = float(not target.check(growth))
            result.params["leak_threshold_mb"] = target.value


def _offset(update: Callable[[int], None], base: int) -> Callable[[int], None]:
    return lambda done: update(base + done)


def run_stress(
    settings: Settings,
    *,
    scenarios: Sequence[str] = ("fast",),
    sizes: StressSizes | None = None,
    app_spec: str | None = None,
    via: str | None = None,
    worker: WorkerConfig | None = None,
    external_workers: bool = False,
    targets: Sequence[str] = (),
    console: Console | None = None,
    repeat: int = 1,
    seed: int | None = None,
) -> LabResult:
    """Run the scenarios on one stack (``repeat`` times each, interleaved in a shuffled
    order: figures are medians with their spread); write and print the result."""
    console = console or Console()
    sizes = sizes or StressSizes()
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise LabError(f"unknown stress scenario(s) {sorted(unknown)}; known: {SCENARIOS}")
    via = via or ("jobs" if app_spec is None else "celery")
    if via == "jobs" and app_spec is not None:
        raise LabError("--via jobs needs tasklab's own stack; with --app the tasks are Celery")
    slos = resolve_targets(DEFAULT_TARGETS, targets)
    result = LabResult(
        "stress",
        params={"scenarios": list(scenarios), "via": via, "sizes": asdict(sizes), "app": app_spec},
    )
    with (
        LabStack(
            settings,
            app_spec=app_spec,
            worker=worker,
            workers="external" if external_workers else "start",
        ) as stack,
        lab_progress(console) as progress,
    ):
        result.params.update(worker=stack.worker_config.as_dict(), broker=stack.broker_label)
        result.servers = stack.server_versions()
        stress = Stress(stack, sizes, result, progress, via=via)
        warm = stress.driver("warmup")
        warm.collect(submit_all(warm, [Probe("noop")] * 2), timeout_s=sizes.timeout_s)
        units = [(s, getattr(stress, s)) for s in SCENARIOS if s in scenarios]
        run_repeated(result, units, repeat=repeat, rng=random.Random(seed))
    flag_leak(result, slos)
    return finish(result, settings, targets=slos, console=console, scope=scenarios)
