"""``tasklab load``: Locust, headless, against the reference service.

On embedded defaults the lab starts the service itself: its broker and database
(``LabStack``), ``seed`` (users with tokens, products with stock), worker processes and the
API (``tasklab api``, uvicorn). With ``url`` it loads a service already running, with the
users of a ``tokens`` file.

Locust runs as a subprocess (it monkey-patches the process with gevent) on
``tasklab/lab/locustfiles/shop.py``: ``ShopUser`` (the seed-004 mix), ``OrderUser`` (orders
only, no think time) and ``SyncUser`` (data-sync submit, then poll to the end). It writes its
CSV files and HTML report next to our JSON; the figures come from its JSON stats. At the end
the orders are given time to settle, and the service's ``check_invariants`` runs.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.progress import lab_progress, phase
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
    order_outcomes,
    seed_shop,
    unlimited,
    wait_orders_settled,
)
from tasklab.lab.stats import quantile
from tasklab.lab.summary import cdf_points
from tasklab.settings import Settings

LOCUSTFILE = Path(__file__).parent / "locustfiles" / "shop.py"
USER_CLASSES = {
    "shop": "ShopUser",
    "orders": "OrderUser",
    "points": "PointsUser",
    "sync": "SyncUser",
    "catalog": "CatalogUser",
}
# The mixed default; ``points`` (reads at full speed) is asked for by name.
DEFAULT_CLASSES = ("shop", "orders", "sync")
FLOW = "FLOW"  # Locust entries that are whole flows, not HTTP requests
STOP_TIMEOUT_S = 2
DEFAULT_TARGETS = (
    # Seed 004 / issue 4: > 100 RPS, success > 95 %, lookups < 100 ms, order creation
    # < 500 ms; and the service's invariants after the load.
    Target("all.requests_per_s", ">", 100.0),
    Target("all.success_pct", ">", 95.0),
    Target("points.latency_ms_p95", "<", 100.0),
    Target("history.latency_ms_p95", "<", 100.0),
    Target("expiring.latency_ms_p95", "<", 100.0),
    Target("order.latency_ms_p95", "<", 500.0),
    Target("shop.orders_lost", "==", 0.0),
    Target("shop.invariant_violations", "==", 0.0),
)


# The endpoints each user class calls (the figure prefixes a run of it measures).
CLASS_ENDPOINTS = {
    "shop": ("points", "history", "expiring", "order"),
    "orders": ("order",),
    "points": ("points",),
    "sync": ("sync_batch", "task_status", "sync_flow"),
    "catalog": ("products", "product", "catalog"),
}


def scope_of(classes: Sequence[str]) -> set[str]:
    """The figure prefixes a run of ``classes`` sets out to measure."""
    return {"all", "shop", *(e for c in classes for e in CLASS_ENDPOINTS[c])}


@dataclass(frozen=True)
class LoadSizes:
    users: int = 20
    spawn_rate: float = 10.0
    duration_s: float = 20.0
    settle_timeout_s: float = 60.0  # give up settling after this long without progress
    shop: ShopSizes = field(default_factory=ShopSizes)

    @classmethod
    def tiny(cls) -> LoadSizes:
        return cls(
            users=4,
            spawn_rate=4.0,
            duration_s=4.0,
            settle_timeout_s=30.0,
            shop=ShopSizes(users=8, products=5),
        )


@dataclass(frozen=True)
class Endpoint:
    """One Locust entry: its requests, failures and response-time histogram (ms -> count)."""

    name: str
    method: str
    requests: int
    failures: int
    histogram: dict[float, int]

    def latencies(self) -> list[float]:
        return [ms for ms, n in sorted(self.histogram.items()) for _ in range(n)]


def slug(name: str) -> str:
    """A Locust entry name as a figure prefix: ``products (setup)`` -> ``setup``."""
    if name.startswith("products (setup)"):
        return "setup"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unnamed"


def read_endpoints(path: Path) -> tuple[list[Endpoint], float]:
    """Locust's ``--json-file`` stats: the entries, and the test's duration in seconds."""
    try:
        raw: list[dict[str, Any]] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LabError(f"Locust wrote no readable stats at {path}: {e}") from e
    entries = [
        Endpoint(
            str(e["name"]),
            str(e["method"]),
            int(e["num_requests"]),
            int(e["num_failures"]),
            {float(k): int(v) for k, v in (e.get("response_times") or {}).items()},
        )
        for e in raw
    ]
    starts = [float(e["start_time"]) for e in raw if e.get("num_requests")]
    ends = [float(e["last_request_timestamp"]) for e in raw if e.get("num_requests")]
    return entries, max(1e-9, max(ends, default=1.0) - min(starts, default=0.0))


def endpoint_figures(entry: Endpoint, duration_s: float) -> dict[str, float]:
    ordered = entry.latencies()
    out = {
        "requests": float(entry.requests),
        "failures": float(entry.failures),
        "requests_per_s": entry.requests / duration_s,
        "failure_pct": 100.0 * entry.failures / entry.requests if entry.requests else 0.0,
    }
    for q in (0.5, 0.95, 0.99):
        out[f"latency_ms_p{int(q * 100)}"] = quantile(ordered, q)
    out["latency_ms_max"] = ordered[-1] if ordered else 0.0
    return out


def total_figures(entries: Sequence[Endpoint], duration_s: float) -> dict[str, float]:
    """Every HTTP request together (flows left out: they are made of requests)."""
    http = [e for e in entries if e.method != FLOW]
    merged: dict[float, int] = {}
    for e in http:
        for ms, n in e.histogram.items():
            merged[ms] = merged.get(ms, 0) + n
    total = Endpoint(
        "all", "", sum(e.requests for e in http), sum(e.failures for e in http), merged
    )
    out = endpoint_figures(total, duration_s)
    out["success_pct"] = 100.0 - out["failure_pct"] if total.requests else 0.0
    return out


def read_failures(path: Path) -> list[dict[str, Any]]:
    """Locust's ``_failures.csv``: one row per (endpoint, reason)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {
                "endpoint": row["Name"],
                "method": row["Method"],
                "reason": row["Error"],
                "count": int(row["Occurrences"]),
            }
            for row in csv.DictReader(f)
        ]


def read_history(path: Path) -> list[Series]:
    """Requests/s and P95 over time, from Locust's ``_stats_history.csv`` (aggregated)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("Name") == "Aggregated"]
    if not rows:
        return []
    t0 = float(rows[0]["Timestamp"])
    rate = [(float(r["Timestamp"]) - t0, _num(r["Requests/s"])) for r in rows]
    p95 = [(float(r["Timestamp"]) - t0, _num(r["95%"])) for r in rows]
    users = [(float(r["Timestamp"]) - t0, _num(r["User Count"])) for r in rows]
    return [
        Series("load: requests per second", "all", "line", "seconds", "requests/s", rate),
        Series("load: P95 response time", "all", "line", "seconds", "ms", p95),
        Series("load: users", "users", "line", "seconds", "users", users),
    ]


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "N/A" before the first request
        return 0.0


def locust_argv(
    *, url: str, tokens: Path, sizes: LoadSizes, classes: Sequence[str], out: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "--users",
        str(sizes.users),
        "--spawn-rate",
        str(sizes.spawn_rate),
        "--run-time",
        f"{max(1, round(sizes.duration_s))}s",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        # The figures start once every user is running: the ramp and each user's setup
        # requests (on_start) are left out.
        "--reset-stats",
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "locust.html"),
        "--json-file",
        str(out / "locust"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--tokens-file",
        str(tokens),
        *(USER_CLASSES[c] for c in classes),
    ]


class Load:
    """One load run: Locust against a URL, then the figures, tables and series."""

    def __init__(
        self, result: LabResult, sizes: LoadSizes, classes: Sequence[str], out: Path
    ) -> None:
        self.result = result
        self.sizes = sizes
        self.classes = classes
        self.out = out

    def run_locust(self, url: str, tokens: Path, console: Console) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        argv = locust_argv(
            url=url, tokens=tokens, sizes=self.sizes, classes=self.classes, out=self.out
        )
        log_path = self.out / "locust.log"
        budget_s = self.sizes.duration_s + STOP_TIMEOUT_S + 60
        with (
            lab_progress(console) as progress,
            phase(progress, f"load: {self.sizes.users} users", round(self.sizes.duration_s)) as up,
            log_path.open("wb") as log,
        ):
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            start = time.monotonic()
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                if elapsed > budget_s:
                    proc.kill()
                    proc.wait()
                    raise LabError(f"Locust did not stop after {budget_s:.0f} s; see {log_path}")
                up(int(elapsed))
                time.sleep(0.25)
        if not (self.out / "locust.json").is_file():
            tail = log_path.read_text(errors="replace")[-2000:]
            raise LabError(f"Locust exited with code {proc.returncode} and no stats:\n{tail}")
        self.result.params["locust_exit_code"] = proc.returncode

    def record(self) -> None:
        entries, duration_s = read_endpoints(self.out / "locust.json")
        for entry in entries:
            self.result.add_figures(slug(entry.name), endpoint_figures(entry, duration_s))
            if entry.requests:
                self.result.series.append(
                    Series(
                        "load: response time",
                        slug(entry.name),
                        "cdf",
                        "ms",
                        "fraction of requests",
                        cdf_points(entry.latencies()),
                    )
                )
        self.result.add_figures("all", total_figures(entries, duration_s))
        self.result.add_figures("all", {"duration_s": duration_s})
        self.result.tables["endpoints"] = endpoint_rows(self.result.figures, entries)
        self.result.tables["failures"] = read_failures(self.out / "locust_failures.csv")
        self.result.series += read_history(self.out / "locust_stats_history.csv")


def endpoint_rows(
    figures: Mapping[str, float], entries: Sequence[Endpoint]
) -> list[dict[str, Any]]:
    rows = []
    for name in [*(slug(e.name) for e in entries), "all"]:
        rows.append(
            {
                "endpoint": name,
                "requests": int(figures.get(f"{name}.requests", 0)),
                "requests_per_s": round(figures.get(f"{name}.requests_per_s", 0.0), 1),
                **{
                    f"p{p}_ms": round(figures.get(f"{name}.latency_ms_p{p}", 0.0), 1)
                    for p in (50, 95, 99)
                },
                "failures": int(figures.get(f"{name}.failures", 0)),
            }
        )
    return rows


def settle_and_check(result: LabResult, settings: Settings, *, timeout_s: float, own: bool) -> None:
    """Let the orders settle, then run the service's invariants on its database. Against a
    service of someone else's (``own`` False) the settings must point at its database."""
    try:
        shop = _settle(settings, timeout_s=timeout_s, own=own)
        # The lab's own service waited for its orders; a shared one may have fresh ones.
        violations = invariant_violations(settings, pending_threshold_s=0.0 if own else timeout_s)
    except Exception as e:  # a database we cannot read: say so, the load figures stand
        if own:
            raise
        result.notes.append(f"invariants not checked: the configured database: {e}")
        return
    shop["invariant_violations"] = len(violations)
    result.add_figures("shop", shop)
    result.notes += [f"invariant violated: {line}" for line in violations]


def _settle(settings: Settings, *, timeout_s: float, own: bool) -> dict[str, float]:
    from tasklab.database import make_engine

    if settings.database_url is None and not settings.sqlite_path.is_file():
        raise LabError(f"no database at {settings.sqlite_path} (set DATABASE_URL)")
    engine = make_engine(settings)
    try:
        shop: dict[str, float] = {}
        if own:  # a shared service may take new orders all the time: nothing to wait for
            started = time.monotonic()
            pending = wait_orders_settled(engine, timeout_s=timeout_s)
            shop["settle_s"] = time.monotonic() - started
            shop["orders_lost"] = pending  # still pending when settling stalled
        return {**shop, **order_outcomes(engine)}
    finally:
        engine.dispose()


def print_load(result: LabResult, console: Console) -> None:
    """The endpoints table, failures by reason, then the figures with targets."""
    table = Table(title="tasklab load: endpoints")
    for col in ("endpoint", "requests", "req/s", "P50 ms", "P95 ms", "P99 ms", "failures"):
        table.add_column(col, justify="left" if col == "endpoint" else "right")
    for row in result.tables.get("endpoints", []):
        table.add_row(
            row["endpoint"],
            format_value(row["requests"]),
            format_value(row["requests_per_s"]),
            *(format_value(row[f"p{p}_ms"]) for p in (50, 95, 99)),
            format_value(row["failures"]),
        )
    console.print(table)
    failures = result.tables.get("failures", [])
    if failures:
        by_reason = Table(title="failures by reason")
        for col in ("endpoint", "reason", "count"):
            by_reason.add_column(col, justify="right" if col == "count" else "left")
        for row in failures:
            by_reason.add_row(
                f"{row['method']} {row['endpoint']}", row["reason"], str(row["count"])
            )
        console.print(by_reason)
    checked = {c.figure for c in result.slos}
    shown = {
        k: v
        for k, v in result.figures.items()
        if k in checked or k.startswith(("shop.", "all.", "machine."))
    }
    slos = [c.to_dict() for c in result.slos]
    print_result(
        {"command": "load", "figures": shown, "slos": slos, "notes": result.notes},
        console,
        path=result.path,
    )


def run_load(
    settings: Settings,
    *,
    sizes: LoadSizes | None = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    url: str | None = None,
    tokens: Path | None = None,
    worker: WorkerConfig | None = None,
    targets: Sequence[str] = (),
    console: Console | None = None,
    on_service: Callable[[str, Path], None] | None = None,
) -> LabResult:
    """Load the reference service (the lab's own, or ``url``); write and print the result.
    ``on_service(api_url, tokens_file)`` is told where the lab's own service listens while
    it runs (the demo prints its console's address)."""
    console = console or Console()
    sizes = sizes or LoadSizes()
    unknown = set(classes) - set(USER_CLASSES)
    if unknown or not classes:
        raise LabError(
            f"unknown user class(es) {sorted(unknown)}; known: {', '.join(USER_CLASSES)}"
        )
    if url is not None and tokens is None:
        raise LabError("--url needs --tokens FILE (the JSON lines `tasklab seed` wrote)")
    if importlib.util.find_spec("locust") is None:
        raise LabError("Locust is not installed: pip install 'tasklab[lab]'")
    slos = resolve_targets(DEFAULT_TARGETS, targets)
    result = LabResult(
        "load",
        params={
            "sizes": asdict(sizes),
            "user_classes": [USER_CLASSES[c] for c in classes],
            "url": url or "the lab's own service",
        },
    )
    out = settings.results_dir / f"load-{result.run_id}"
    load = Load(result, sizes, classes, out)
    if url is not None and tokens is not None:
        load.run_locust(url, tokens, console)
        load.record()
        settle_and_check(result, settings, timeout_s=sizes.settle_timeout_s, own=False)
    else:
        _load_own_service(settings, load, worker, console, on_service)
    result.params["locust_output"] = str(out)
    result.check(slos, scope=scope_of(classes))
    result.finished_at = time.time()
    write_result(result, settings)
    print_load(result, console)
    return result


def catalog_cache_figures(api_url: str) -> dict[str, float]:
    """The catalog caches' hits over the run, from the API's ``/metrics`` (their counters
    start with the process): ``catalog.cache_hit_pct`` (details, pages: L1 or L2) and
    ``catalog.stock_hit_pct`` (the stock kept apart), with the lookups behind each."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{api_url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.labels.get("cache", ""), family.name, sample.labels.get("level", ""))
            if sample.name.endswith("_total"):
                counts[key] = counts.get(key, 0.0) + sample.value
    figures: dict[str, float] = {}
    for cache, prefix in (("products", "catalog.cache"), ("product-stock", "catalog.stock")):
        hits = sum(counts.get((cache, "tasklab_cache_hits", lv), 0.0) for lv in ("l1", "l2"))
        lookups = hits + counts.get((cache, "tasklab_cache_misses", "l2"), 0.0)
        if lookups:
            figures[f"{prefix}_lookups"] = lookups
            figures[f"{prefix}_hit_pct"] = 100 * hits / lookups
            figures[f"{prefix}_loads"] = counts.get((cache, "tasklab_cache_loader_calls", ""), 0.0)
    return figures


def _load_own_service(
    settings: Settings,
    load: Load,
    worker: WorkerConfig | None,
    console: Console,
    on_service: Callable[[str, Path], None] | None = None,
) -> None:
    with LabStack(settings, worker=worker) as stack:
        load.result.servers = stack.server_versions()
        load.result.params.update(
            worker=stack.worker_config.as_dict(), broker=stack.broker_label, rate_limits="off"
        )
        tokens = seed_shop(stack.settings, load.sizes.shop)
        # The lab measures the service, not its abuse limits: one client address sending
        # hundreds of requests a second would only measure the limiter.
        api = ApiProcess(
            unlimited(stack.settings),
            log_path=stack.lab_dir / "logs" / f"api-{stack.run_id}.log",
            workers=settings.api_workers,
        )
        try:
            api_url = api.start()
            if on_service is not None:
                on_service(api_url, tokens)
            load.run_locust(api_url, tokens, console)
            load.record()
            load.result.figures.update(catalog_cache_figures(api_url))
            settle_and_check(
                load.result, stack.settings, timeout_s=load.sizes.settle_timeout_s, own=True
            )
        finally:
            api.stop()
