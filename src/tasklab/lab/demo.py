"""``tasklab demo``: the embedded stack, 1,000 no-op tasks through it, one table of figures."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from tasklab.celery_app import make_celery
from tasklab.lab.stats import percentiles
from tasklab.settings import Settings
from tasklab.stack import embedded_env
from tasklab.supervisor import Component, Supervisor, child_env, tasklab_argv


def worker_rss_mb(supervisor: Supervisor) -> float:
    total = 0
    for comp in supervisor.components:
        if comp.process is None:
            continue
        try:
            root = psutil.Process(comp.process.pid)
            total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            continue
    return total / 1e6


def run_demo(settings: Settings, *, tasks: int, console: Console) -> dict[str, Any]:
    with ExitStack() as stack:
        env = child_env(embedded_env(settings, stack, console))
        run_settings = settings.model_copy(update={"redis_url": env.get("REDIS_URL",
                                                                     settings.redis_url)})
        worker = Component("worker", tasklab_argv(
            "worker", "--concurrency", str(settings.effective_concurrency)))
        supervisor = Supervisor([worker], env=env, console=Console(stderr=True, quiet=True))
        supervisor.start(worker)
        stack.callback(supervisor.stop_all)
        figures = _run_noops(run_settings, tasks)
        figures["worker_rss_mb"] = worker_rss_mb(supervisor)
    _print(figures, console)
    return figures


def _run_noops(settings: Settings, tasks: int) -> dict[str, Any]:
    celery = make_celery(settings)
    # Warm-up: the first task waits for the worker to boot; keep it out of the figures.
    celery.send_task("tasklab.probe.noop").get(timeout=60)
    start = time.time()
    results = [celery.send_task("tasklab.probe.noop", kwargs={"sent_at": time.time()})
               for _ in range(tasks)]
    values = [r.get(timeout=120) for r in results]
    elapsed = time.time() - start
    e2e_ms = [(v["finished_at"] - v["sent_at"]) * 1000 for v in values]
    return {"submitted": tasks, "succeeded": len(values), "elapsed_s": elapsed,
            "throughput_per_s": tasks / elapsed, **percentiles(e2e_ms, "e2e_ms")}


def _print(figures: dict[str, Any], console: Console) -> None:
    table = Table(title="tasklab demo: no-op tasks on the embedded stack")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("submitted", f"{figures['submitted']:,}")
    table.add_row("succeeded", f"{figures['succeeded']:,}")
    table.add_row("throughput (tasks/s)", f"{figures['throughput_per_s']:,.0f}")
    for p in ("p50", "p95", "p99"):
        table.add_row(f"end-to-end latency {p.upper()} (ms)", f"{figures[f'e2e_ms_{p}']:.1f}")
    table.add_row("worker RSS (MB)", f"{figures['worker_rss_mb']:.0f}")
    console.print(table)
