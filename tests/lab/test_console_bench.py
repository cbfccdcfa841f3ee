"""``tasklab console-bench``: a small fill, every page timed, and the machine's load read over
the timed requests (not after them). Never the speed."""

from __future__ import annotations

from rich.console import Console

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
    settings: Settings,
) -> None:
    result = run_console_bench(
        settings, rows=3000, repeat=3, days=30, console=Console(width=120, record=True)
    )
    figures = read_json(result.path)["figures"]
    assert figures["fill.seconds"] > 0
    for page in PAGES:
        p50, p95, top = (figures[f"{page}.{k}"] for k in ("p50_ms", "p95_ms", "max_ms"))
        assert 0 < p50 <= p95 <= top, page
    # the requests ran in this process while the watch ran: its CPU shows as the lab's
    assert figures["machine.lab_cpu_cores"] > 0
    assert 0 <= figures["machine.other_cpu_pct"] <= 100
