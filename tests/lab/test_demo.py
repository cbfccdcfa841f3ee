"""``tasklab demo`` shrunk to seconds per phase: every phase runs, one SLO table, one report."""

from __future__ import annotations

import psutil
import pytest
from rich.console import Console
from typer.testing import CliRunner

from tasklab.cli import app
from tasklab.lab.demo import DemoSizes, embedded, run_demo
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json


@pytest.mark.timeout(420)  # the soak's recovery waits out the production defaults
@pytest.mark.long
def test_the_demo_runs_every_phase_prints_one_slo_table_and_writes_the_report(
    lab_settings: Settings, console: Console
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    outcome = run_demo(lab_settings, console=console, sizes=DemoSizes.tiny())

    assert [p.name for p in outcome.phases] == [
        "stress fast",
        "bench overhead",
        "drill kill + outage",
        "drill soak",
        "load",
        "load capacity",
    ]
    logs = sorted((lab_settings.home_dir / "lab" / "logs").glob("demo-*.log"))
    assert all(p.error is None for p in outcome.phases), (
        [p.error for p in outcome.phases],
        logs[-1].read_text()[-6000:] if logs else "no demo log",
    )
    assert outcome.ok, outcome.broken
    shown = printed(console)
    assert shown.count("tasklab demo: service levels") == 1
    # while the load phase's stack runs, where its jobs console is and how to log in
    console_line = next(line for line in shown.splitlines() if "/console (log in" in line)
    assert "http://127.0.0.1:" in console_line and "admin token in" in console_line
    for row in (
        "stress.fast.throughput_per_s",
        "drill.kill.lost",
        "drill.kill.duplicate_effects",
        "drill.outage.lost",
        "drill.soak.lost",
        "drill.soak.over_bound",
        "load.all.requests_per_s",
        "load.shop.invariant_violations",
        "bench.overhead.jobs_overhead_pct",
        "load_capacity.capacity.knee_per_s",
    ):
        assert row in shown, row

    assert outcome.report == lab_settings.home_dir / "report" / "index.html"
    html = outcome.report.read_text()
    for command in ("stress", "bench", "drill", "load"):
        assert f'<section class="result" id="{command}-' in html, command
    assert '<table class="slo sortable">' in html
    assert "kill.lost" in html and "shop.invariant_violations" in html
    assert html.count('<svg class="chart"') >= 4

    demo = read_json(outcome.result.path)
    assert demo["command"] == "demo"
    assert {s["figure"] for s in demo["slos"]} >= {"drill.kill.lost", "load.shop.orders_lost"}
    assert demo["figures"]["phase.total_s"] > 0
    assert [p["error"] for p in demo["params"]["phases"]] == [None] * 6
    assert "load_capacity.capacity.knee_per_s" in demo["figures"]
    alive = {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE
    }
    assert alive <= before, "a worker, the API or Redis outlived the demo"


def test_the_demo_never_uses_a_configured_broker_or_database() -> None:
    settings = Settings(redis_url="redis://prod:6379/0", database_url="postgresql://db/app")
    local = embedded(settings)
    assert (local.redis_url, local.broker_url, local.database_url) == (None, None, None)


def test_drill_and_load_are_tasklab_commands() -> None:
    runner = CliRunner()
    for command in ("drill", "load", "demo"):
        reply = runner.invoke(app, [command, "--help"])
        assert reply.exit_code == 0, reply.output
    assert "kill, outage, flush, api, soak" in runner.invoke(app, ["drill", "--help"]).output


def test_a_phase_whose_connection_drops_once_is_re_run_and_a_second_drop_fails_it(
    console: Console,
) -> None:
    import redis

    from tasklab.lab.demo import Phase, _run_phase
    from tasklab.lab.results import LabResult

    calls: list[int] = []

    def flaky() -> LabResult:
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return LabResult("stress")

    hiccup = Phase("stress fast", flaky)
    _run_phase(hiccup, "[1/1]", console)
    assert (hiccup.error, len(calls)) == (None, 2)
    assert hiccup.retried == "ConnectionError: Connection closed by server."

    def broken() -> LabResult:
        calls.append(1)
        raise redis.ConnectionError("Connection refused")

    calls.clear()
    fault = Phase("stress fast", broken)
    _run_phase(fault, "[1/1]", console)
    assert fault.error == "ConnectionError: Connection refused" and len(calls) == 2

    def bug() -> LabResult:
        calls.append(1)
        raise ValueError("not a connection problem")

    calls.clear()
    wrong = Phase("stress fast", bug)
    _run_phase(wrong, "[1/1]", console)
    assert wrong.error == "ValueError: not a connection problem" and len(calls) == 1
