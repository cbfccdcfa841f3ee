"""``tasklab console-bench``: a small fill, every page timed, and the machine's load read over
the timed requests (not after them). Never the speed."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rich.console import Console

from tasklab.lab import console_bench
from tasklab.lab.console_bench import run_console_bench
from tasklab.settings import Settings
from tests.lab.helpers import read_json

PAGES = (
    "overview",
    "jobs",
    "jobs_next_page",
    "jobs_dead",
    "jobs_task",
    "jobs_queue",
    "jobs_owner",
    "jobs_task_status_old",
    "job",
    "dead_letters",
)


def test_a_small_console_bench_times_every_page_and_reads_the_machine_over_the_requests(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed_from: list[float] = []
    real_time_pages = console_bench.time_pages

    async def noting_time_pages(*args: Any, **kwargs: Any) -> dict[str, list[float]]:
        timed_from.append(time.monotonic())
        return await real_time_pages(*args, **kwargs)

    monkeypatch.setattr(console_bench, "time_pages", noting_time_pages)
    result = run_console_bench(
        settings, rows=3000, repeat=3, days=30, console=Console(width=120, record=True)
    )
    figures = read_json(result.path)["figures"]
    assert figures["fill.seconds"] > 0
    for page in PAGES:
        p50, p95, top = (figures[f"{page}.{k}"] for k in ("p50_ms", "p95_ms", "max_ms"))
        assert 0 < p50 <= p95 <= top, page
    # the watch started before the timed requests (and after the fill, which it leaves out)
    assert result.cpu.started <= timed_from[0]
    assert result.cpu.started >= timed_from[0] - figures["fill.seconds"] / 2
    assert figures["machine.lab_cpu_cores"] > 0
    assert 0 <= figures["machine.other_cpu_pct"] <= 100
