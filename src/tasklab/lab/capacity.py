"""``tasklab load --rate R`` and ``tasklab load --find-capacity``: the open-loop load
(``tasklab.lab.openloop``) against the reference service's orders endpoint.

``--rate R`` offers R requests a second for a while and reports the latency from each
request's due time, the errors, whether the workers kept up (the pending orders did not
grow) and, for the orders accepted, their settlement jobs' queue wait (created to started)
and end-to-end time (created to finished) from the job records.

``--find-capacity`` offers a rising rate, one step at a time (the backlog of the previous
step drained first), until a step's P99 exceeds the SLO, its errors exceed 0.1 %, the
pending orders grow during the step (the workers fall behind), or the generator cannot keep
its own schedule; the **knee** is the highest step that passed all four: the rate the
service sustains within its SLO with its workers keeping up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.openloop import ENDPOINTS, OpenLoop, Outcome, Schedule
from tasklab.lab.results import (
    LabResult,
    Series,
    Target,
    format_value,
    print_result,
    resolve_targets,
    write_result,
)
from tasklab.lab.shop import (
    ApiProcess,
    ShopSizes,
    invariant_violations,
    pending_orders,
    product_ids,
    read_tokens,
    seed_shop,
    unlimited,
    wait_orders_settled,
)
from tasklab.lab.stats import percentiles
from tasklab.lab.summary import cdf_points
from tasklab.settings import Settings

MAX_ERROR_PCT = 0.1
# The pending orders may grow by this share of the offered rate (and at least
# MIN_GROWTH_PER_S) and still count as kept up: the count is sampled, so it wobbles.
KEEP_UP_SHARE = 0.05
MIN_GROWTH_PER_S = 2.0
MAX_GENERATOR_LAG_MS = 50.0  # later than this at P99, the generator (not the service) limits
STEADY_TARGETS = (
    # Seed 004: order creation < 500 ms; P95 < 100 ms on what a task waits and on the whole
    # way (order accepted to settled), at the stated rate; nothing lost.
    Target("open.latency_ms_p99", "<", 500.0),
    Target("open.error_pct", "<=", MAX_ERROR_PCT),
    Target("open.keeping_up", "==", 1.0),
    Target("open.queue_wait_ms_p95", "<", 100.0),
    Target("open.e2e_ms_p95", "<", 100.0),
    Target("shop.orders_lost", "==", 0.0),
    Target("shop.invariant_violations", "==", 0.0),
)
CAPACITY_TARGETS = (
    Target("capacity.knee_per_s", ">", 100.0),  # seed 004: > 100 RPS
    Target("shop.invariant_violations", "==", 0.0),
)


@dataclass(frozen=True)
class OpenLoadSizes:
    rate_per_s: float = 50.0
    duration_s: float = 10.0  # counted seconds (each step's, with --find-capacity)
    warmup_s: float = 1.0
    endpoint: str = "orders"
    slo_p99_ms: float = 500.0
    start_rate_per_s: float = 25.0
    step_factor: float = 1.5
    max_steps: int = 12
    drain_timeout_s: float = 30.0  # give up draining after this long without progress
    shop: ShopSizes = field(default_factory=ShopSizes)

    @classmethod
    def tiny(cls) -> OpenLoadSizes:
        return cls(
            rate_per_s=20.0,
            duration_s=2.0,
            warmup_s=0.5,
            start_rate_per_s=10.0,
            step_factor=2.0,
            max_steps=2,
            drain_timeout_s=20.0,
            shop=ShopSizes(users=8, products=5),
        )

    def schedule(self, rate_per_s: float) -> Schedule:
        return Schedule(
            rate_per_s=rate_per_s,
            duration_s=self.duration_s,
            warmup_s=self.warmup_s,
            endpoint=self.endpoint,
        )

    def rates(self) -> list[float]:
        return [
            round(self.start_rate_per_s * self.step_factor**i, 1) for i in range(self.max_steps)
        ]


def judge(figures: dict[str, float], *, slo_p99_ms: float, judge_backlog: bool) -> list[str]:
    """Why a step does not count as sustained (empty: it does)."""
    reasons = []
    if figures["requests"] == 0 or figures["latency_ms_p99"] > slo_p99_ms:
        reasons.append(f"P99 {figures['latency_ms_p99']:.0f} ms > SLO {slo_p99_ms:.0f} ms")
    if figures["error_pct"] > MAX_ERROR_PCT:
        reasons.append(f"errors {figures['error_pct']:.2f} % > {MAX_ERROR_PCT} %")
    growth = figures.get("backlog_growth_per_s")
    allowed = max(MIN_GROWTH_PER_S, KEEP_UP_SHARE * figures["offered_per_s"])
    if judge_backlog and (growth is None or growth > allowed):
        shown = "not measured" if growth is None else f"+{growth:.1f}/s"
        reasons.append(f"workers fall behind: pending orders {shown}")
    if figures["generator_lag_ms_p99"] > MAX_GENERATOR_LAG_MS:
        reasons.append(f"the generator ran {figures['generator_lag_ms_p99']:.0f} ms late (P99)")
    return reasons


def job_timings(engine: Engine, job_ids: Sequence[str]) -> dict[str, float]:
    """Queue wait (created to started) and end-to-end (created to finished) of the jobs, ms."""
    from tasklab.jobs.records import jobs

    waits: list[float] = []
    e2e: list[float] = []
    unfinished = 0
    ids = list(job_ids)
    with engine.connect() as conn:
        for i in range(0, len(ids), 500):
            stmt = sa.select(jobs.c.created_at, jobs.c.started_at, jobs.c.finished_at).where(
                jobs.c.id.in_(ids[i : i + 500])
            )
            for created, started, finished in conn.execute(stmt):
                if started is None or finished is None:
                    unfinished += 1
                    continue
                waits.append((started - created) * 1000)
                e2e.append((finished - created) * 1000)
    return {
        **percentiles(waits, "queue_wait_ms"),
        **percentiles(e2e, "e2e_ms"),
        "jobs_timed": float(len(e2e)),
        "jobs_unfinished": float(unfinished),
    }


class OpenLoad:
    """One open-loop run on a service: its steps, figures, tables and series."""

    def __init__(
        self, result: LabResult, sizes: OpenLoadSizes, loop: OpenLoop, engine: Engine | None
    ) -> None:
        self.result = result
        self.sizes = sizes
        self.loop = loop
        self.engine = engine

    def drain(self) -> int:
        if self.engine is None:
            return 0
        return wait_orders_settled(self.engine, timeout_s=self.sizes.drain_timeout_s)

    def step(self, rate_per_s: float, console: Console) -> tuple[Outcome, dict[str, float]]:
        self.drain()
        console.print(f"open loop: {rate_per_s:g} requests/s for {self.sizes.duration_s:g} s")
        outcome = self.loop.run(self.sizes.schedule(rate_per_s))
        figures = outcome.figures()
        figures["keeping_up"] = float(not any("behind" in r for r in self._reasons(figures)))
        return outcome, figures

    def _reasons(self, figures: dict[str, float]) -> list[str]:
        return judge(
            figures,
            slo_p99_ms=self.sizes.slo_p99_ms,
            judge_backlog=self.engine is not None and self.sizes.endpoint == "orders",
        )

    def steady(self, console: Console) -> None:
        outcome, figures = self.step(self.sizes.rate_per_s, console)
        self.drain()
        if self.engine is not None and outcome.job_ids:
            figures.update(job_timings(self.engine, outcome.job_ids))
        self.result.add_figures("open", figures)
        self.result.tables["steps"] = [self._row(figures)]
        self._series(outcome, f"{self.sizes.rate_per_s:g}/s")
        self.result.notes += [f"open loop: {r}" for r in self._reasons(figures)]

    def find_capacity(self, console: Console) -> None:
        rows, knee = [], None
        for rate in self.sizes.rates():
            outcome, figures = self.step(rate, console)
            reasons = self._reasons(figures)
            rows.append({**self._row(figures), "verdict": _verdict(reasons)})
            if reasons:
                self.result.notes.append(f"capacity: stopped at {rate:g}/s: {'; '.join(reasons)}")
                break
            knee = figures
            self._series(outcome, f"{rate:g}/s")
        else:
            self.result.notes.append(
                f"capacity: every step up to {self.sizes.rates()[-1]:g}/s was sustained; "
                "the knee is at least that (raise --max-steps)"
            )
        self.drain()
        self.result.tables["steps"] = rows
        self.result.add_figures("capacity", _knee_figures(knee, len(rows)))
        self._capacity_series(rows)

    def _row(self, figures: dict[str, float]) -> dict[str, Any]:
        keys = ("offered_per_s", "answered_per_s", "latency_ms_p50", "latency_ms_p99")
        row: dict[str, Any] = {k: round(figures.get(k, 0.0), 1) for k in keys}
        row["error_pct"] = round(figures["error_pct"], 2)
        row["backlog_growth_per_s"] = _rounded(figures.get("backlog_growth_per_s"))
        row["settled_per_s"] = _rounded(figures.get("settled_per_s"))
        row["generator_lag_ms_p99"] = round(figures["generator_lag_ms_p99"], 1)
        row["generator_cpu_pct"] = round(figures["generator_cpu_pct"], 1)
        return row

    def _series(self, outcome: Outcome, label: str) -> None:
        self.result.series.append(
            Series(
                "open loop: latency from the due time",
                label,
                "cdf",
                "ms",
                "fraction of requests",
                cdf_points(sorted(outcome.latencies_ms)),
            )
        )
        if outcome.backlog:
            self.result.series.append(
                Series(
                    "open loop: pending orders", label, "line", "seconds", "orders", outcome.backlog
                )
            )

    def _capacity_series(self, rows: list[dict[str, Any]]) -> None:
        x = [float(r["offered_per_s"]) for r in rows]
        for name, key, unit in (
            ("capacity: P99 by offered rate", "latency_ms_p99", "ms"),
            ("capacity: answered by offered rate", "answered_per_s", "requests/s"),
            ("capacity: settled by offered rate", "settled_per_s", "orders/s"),
        ):
            points = [
                (xi, float(r[key])) for xi, r in zip(x, rows, strict=True) if r[key] is not None
            ]
            if points:
                self.result.series.append(
                    Series(name, key, "line", "offered requests/s", unit, points)
                )


def _verdict(reasons: Sequence[str]) -> str:
    """A step's verdict in a word or two (the notes have the reasons in full)."""
    if not reasons:
        return "sustained"
    words = {"SLO": "P99", "errors": "errors", "behind": "backlog", "generator": "generator"}
    return "stop: " + ", ".join(w for key, w in words.items() if any(key in r for r in reasons))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _knee_figures(knee: dict[str, float] | None, steps: int) -> dict[str, float]:
    out = {"steps": float(steps), "knee_per_s": knee["offered_per_s"] if knee else 0.0}
    if knee:
        out["knee_latency_ms_p99"] = knee["latency_ms_p99"]
        out["knee_answered_per_s"] = knee["answered_per_s"]
        out["knee_generator_cpu_pct"] = knee["generator_cpu_pct"]
        if "settled_per_s" in knee:
            out["knee_settled_per_s"] = knee["settled_per_s"]
    return out


def print_open_load(result: LabResult, console: Console) -> None:
    table = Table(title="tasklab load: open loop (latency from each request's due time)")
    cols = (
        ("offered/s", "offered_per_s"),
        ("answered/s", "answered_per_s"),
        ("P50 ms", "latency_ms_p50"),
        ("P99 ms", "latency_ms_p99"),
        ("errors %", "error_pct"),
        ("pending +/s", "backlog_growth_per_s"),
        ("settled/s", "settled_per_s"),
        ("gen. lag P99 ms", "generator_lag_ms_p99"),
        ("gen. CPU %", "generator_cpu_pct"),
    )
    for title, _ in cols:
        table.add_column(title, justify="right")
    steps = result.tables.get("steps", [])
    if steps and "verdict" in steps[0]:
        table.add_column("verdict")
    for row in steps:
        cells = [format_value(row[key]) for _, key in cols]
        table.add_row(*cells, *([row["verdict"]] if "verdict" in row else []))
    console.print(table)
    print_result(result, console, path=result.path)


def run_open_load(
    settings: Settings,
    *,
    sizes: OpenLoadSizes | None = None,
    find_capacity: bool = False,
    url: str | None = None,
    tokens: Path | None = None,
    worker: WorkerConfig | None = None,
    targets: Sequence[str] = (),
    console: Console | None = None,
) -> LabResult:
    """Open-loop load on the reference service (the lab's own, or ``url``)."""
    console = console or Console()
    sizes = sizes or OpenLoadSizes()
    if sizes.endpoint not in ENDPOINTS:
        raise LabError(f"unknown endpoint {sizes.endpoint!r}; known: {', '.join(ENDPOINTS)}")
    if url is not None and tokens is None:
        raise LabError("--url needs --tokens FILE (the JSON lines `tasklab seed` wrote)")
    defaults = CAPACITY_TARGETS if find_capacity else STEADY_TARGETS
    slos = resolve_targets(defaults, targets)
    mode = "find-capacity" if find_capacity else f"open loop at {sizes.rate_per_s:g}/s"
    result = LabResult(
        "load",
        params={"mode": mode, "open_loop": asdict(sizes), "url": url or "the lab's own service"},
    )

    def body(run: OpenLoad) -> None:
        (run.find_capacity if find_capacity else run.steady)(console)

    if url is not None and tokens is not None:
        _on_url(settings, result, sizes, url, tokens, body)
    else:
        _on_own_service(settings, result, sizes, worker, body)
    result.check(slos)
    result.finished_at = time.time()
    write_result(result, settings)
    print_open_load(result, console)
    return result


def _on_own_service(
    settings: Settings,
    result: LabResult,
    sizes: OpenLoadSizes,
    worker: WorkerConfig | None,
    body: Callable[[OpenLoad], None],
) -> None:
    from tasklab.database import make_engine

    with LabStack(settings, worker=worker) as stack:
        result.servers = stack.server_versions()
        result.params.update(
            worker=stack.worker_config.as_dict(), broker=stack.broker_label, rate_limits="off"
        )
        accounts = read_tokens(seed_shop(stack.settings, sizes.shop))
        engine = make_engine(stack.settings)
        # The lab measures the service, not its abuse limits: one client address sending
        # hundreds of requests a second would only measure the limiter.
        api = ApiProcess(
            unlimited(stack.settings),
            log_path=stack.lab_dir / "logs" / f"api-{stack.run_id}.log",
            workers=settings.api_workers,
        )
        try:
            loop = OpenLoop(
                api.start(), accounts, product_ids(engine), pending=lambda: pending_orders(engine)
            )
            body(OpenLoad(result, sizes, loop, engine))
            _check_shop(result, stack.settings, engine, sizes.drain_timeout_s)
        finally:
            api.stop()
            engine.dispose()


def _on_url(
    settings: Settings,
    result: LabResult,
    sizes: OpenLoadSizes,
    url: str,
    tokens: Path,
    body: Callable[[OpenLoad], None],
) -> None:
    from tasklab.database import make_engine

    accounts = read_tokens(tokens)
    engine = None
    if settings.database_url is not None or settings.sqlite_path.is_file():
        engine = make_engine(settings)
    else:
        result.notes.append(
            "no database configured: whether the workers keep up was not judged (set "
            "DATABASE_URL to the service's)"
        )
    try:
        products = product_ids(engine) if engine is not None else [1]
        pending = None if engine is None else (lambda: pending_orders(engine))
        body(OpenLoad(result, sizes, OpenLoop(url, accounts, products, pending=pending), engine))
    finally:
        if engine is not None:
            engine.dispose()


def _check_shop(
    result: LabResult, settings: Settings, engine: Engine, drain_timeout_s: float
) -> None:
    """Orders still pending after the drain are lost; then the service's invariants."""
    lost = wait_orders_settled(engine, timeout_s=drain_timeout_s)
    violations = invariant_violations(settings, pending_threshold_s=0.0)
    result.add_figures(
        "shop", {"orders_lost": float(lost), "invariant_violations": float(len(violations))}
    )
    result.notes += [f"invariant violated: {line}" for line in violations]
