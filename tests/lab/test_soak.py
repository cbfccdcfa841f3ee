"""``tasklab drill soak``: the bound and the broker reading it relies on, on rows and messages
made here; then the tiny soak against real servers (embedded Redis, worker processes, SQLite
and PostgreSQL) — its ledger, and proof that every fault happened as planned."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from rich.console import Console
from typer.testing import CliRunner

from tasklab.cli import app
from tasklab.lab.drill import DrillSizes, RecoveryKnobs, default_targets, run_drill
from tasklab.lab.soak import PRODUCTION_KNOBS, SoakSizes, middle_rate
from tasklab.lab.soak_bound import FALLBACK_JOBS, Carried, comparable_wait_s, judge
from tasklab.lab.soak_faults import OpenLoop, message_jobs, scan_broker
from tasklab.lab.workload import Probe, Sample, Ticket
from tasklab.settings import Settings
from tests.lab.helpers import read_json, slo
from tests.support.backends import SQLITE_HERE_POSTGRES_LONG

T0 = 1_000_000.0


def row(created: float, started: float | None, finished: float | None, **kw: Any) -> dict[str, Any]:
    return {
        "status": "SUCCEEDED",
        "attempt": 1,
        "via": "broker",
        "created_at": T0 + created,
        "started_at": None if started is None else T0 + started,
        "finished_at": None if finished is None else T0 + finished,
        **kw,
    }


# --- the bound ----------------------------------------------------------------------------------


def test_the_queue_wait_of_the_bound_is_the_longest_of_unaffected_jobs_offered_in_the_window() -> (
    None
):
    rows = {
        "before": row(-5, 30, 31),  # offered before the fault: not comparable
        "a": row(1, 4, 5),  # waited 3 s
        "b": row(2, 9, 10),  # waited 7 s: the longest in the window
        "retried": row(3, 40, 41, attempt=2),  # a second attempt is not a plain wait
        "local": row(4, 50, 51, via="local"),  # ran in the submitter's fallback
        "cancelled": row(5, None, 6, status="CANCELLED"),
        "carried": row(6, 60, 61),  # the affected job itself
        "late": row(20, 21, 22),  # offered after the window
    }
    wait = comparable_wait_s(rows, fault_at=T0, window_s=10.0, exclude={"carried"})
    assert wait == pytest.approx(7.0)
    assert comparable_wait_s({}, fault_at=T0, window_s=10.0, exclude=set()) is None


def test_after_the_offer_the_last_jobs_offered_stand_in_for_the_queue_wait() -> None:
    # Offered at 0..11 s; the first two waited 100 s, job i >= 2 waited i s. A fault at 20 s:
    # nothing was offered in [20, 25], so the last FALLBACK_JOBS offered (2..11) stand in.
    waits = [100.0, 100.0, *range(2, 12)]
    rows = {f"j{i}": row(i, i + w, i + w + 0.5) for i, w in enumerate(waits)}
    assert len(rows) == FALLBACK_JOBS + 2
    wait = comparable_wait_s(rows, fault_at=T0 + 20, window_s=5.0, exclude=set())
    assert wait == pytest.approx(11.0)


def test_a_carried_job_is_judged_against_recovery_plus_queue_wait_plus_its_own_run() -> None:
    comparable = {"x": row(0, 4, 5)}  # queue wait 4 s
    rows = {
        "fast": row(-1, 60, 61),  # finished 61 s after the fault at T0
        "slow": row(-1, 80, 82),  # 82 s
        "never": row(-1, None, None, status="QUEUED"),
    }
    carried = [Carried(j, "worker_reserved", T0) for j in rows]
    verdicts = {v.job_id: v for v in judge(carried, rows, comparable, recovery_s=50.0)}

    assert verdicts["fast"].bound_s == pytest.approx(50 + 4 + 1)
    assert verdicts["fast"].latency_s == pytest.approx(61) and verdicts["fast"].over is True
    assert verdicts["slow"].bound_s == pytest.approx(50 + 4 + 2) and verdicts["slow"].over
    assert verdicts["never"].latency_s is None and verdicts["never"].over
    within = judge(carried[:1], rows, comparable, recovery_s=60.0)[0]
    assert within.over is False and within.margin_s == pytest.approx(65 - 61)


# --- what the broker carries ----------------------------------------------------------------------


def kombu_message(task: str, args: list[Any], message_id: str) -> str:
    body = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "headers": {"task": task, "id": message_id},
            "properties": {"body_encoding": "base64"},
        }
    )


def test_the_broker_scan_finds_jobs_waiting_in_lists_and_delivered_in_the_unacked_hash(
    redis_url: str,
) -> None:
    a, b, c, d = (f"{n}" * 32 for n in "abcd")
    client = redis.Redis.from_url(redis_url)
    client.lpush("default", kombu_message("tasklab.bundle", ["t", [a, b], "default", 5], "m1"))
    client.lpush("default:4", kombu_message("tasklab.probe_job.effect", [c], "m2"))
    unacked = [json.loads(kombu_message("tasklab.probe_job.effect", [d], "m3")), "", "default"]
    client.hset("unacked", "tag", json.dumps(unacked))
    client.lpush("default", "not a message")

    carried = scan_broker(client)
    assert carried == {a: {"m1"}, b: {"m1"}, c: {"m2"}, d: {"m3"}}
    assert message_jobs(json.loads(kombu_message("tasklab.bundle", ["t", "oops"], "m"))) == (
        "m",
        [],
    )


# --- the open loop --------------------------------------------------------------------------------


class TimedDriver:
    """Records when each submit started; each takes ``submit_s``."""

    def __init__(self, submit_s: float = 0.0) -> None:
        self.submit_s = submit_s
        self.at: list[float] = []

    def submit(self, probe: Probe, *, priority: int | None = None) -> Ticket:
        self.at.append(time.monotonic())
        time.sleep(self.submit_s)
        return Ticket(str(len(self.at)), time.time(), self.submit_s * 1e3)


def open_loop(driver: TimedDriver) -> OpenLoop:
    return OpenLoop(
        driver,  # type: ignore[arg-type]
        Probe("noop"),
        rate_per_s=20,
        duration_s=1.0,
        tick_s=0.25,
        update=lambda n: None,
    )


def test_the_open_loop_offers_on_its_schedule_in_groups_per_tick() -> None:
    driver = TimedDriver()
    loop = open_loop(driver)
    start = time.monotonic()
    loop.run()
    assert loop.planned == 20 and len(loop.tickets) == 20 and loop.refused == 0
    offsets = [t - start for t in driver.at]
    for k in range(4):  # 5 jobs at the start of each 0.25 s tick, back to back
        assert offsets[5 * k : 5 * k + 5] == pytest.approx([0.25 * k] * 5, abs=0.05)
    assert loop.lag_s_max < 0.05


def test_an_open_loop_that_falls_behind_catches_up_instead_of_slowing_the_offer() -> None:
    driver = TimedDriver(submit_s=0.08)  # a tick's 5 submits take 0.4 s: more than a tick
    loop = open_loop(driver)
    start = time.monotonic()
    loop.run()
    assert len(loop.tickets) == 20
    # Never a pause once late: 20 submits of 80 ms back to back, and it says how late.
    assert time.monotonic() - start == pytest.approx(1.6, abs=0.3)
    gaps = [b - a for a, b in zip(driver.at, driver.at[1:], strict=False)]
    assert max(gaps) < 0.15
    assert loop.lag_s_max == pytest.approx(0.45, abs=0.15)


def test_the_capacity_is_the_middle_rate_of_the_calibration_finishes() -> None:
    samples = [Sample(str(i), "succeeded", 0.0, 0.0, T0 + i * 0.5) for i in range(20)]
    assert middle_rate(samples) == pytest.approx(2.0)
    assert middle_rate(samples[:3]) is None


# --- the drill against real servers ---------------------------------------------------------------


def alive_children() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE
    }


@SQLITE_HERE_POSTGRES_LONG
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_soak_loses_nothing_repeats_nothing_and_every_fault_happened(
    database_url: str | None, tmp_path: Path, console: Console
) -> None:
    settings = Settings(
        home_dir=tmp_path / ".tasklab", worker_concurrency=2, database_url=database_url
    )
    _soak_holds(settings, console)


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.timeout(300)
@pytest.mark.long
def test_the_soak_on_rabbitmq_cuts_its_link_and_loses_nothing(
    postgres_url: str, tmp_path: Path, console: Console
) -> None:
    import os

    from tests.support.rabbitmq import own_vhost

    amqp = os.environ.get("TEST_RABBITMQ_URL")
    if not amqp:
        pytest.skip("TEST_RABBITMQ_URL is not set (make test sets it when RabbitMQ answers)")
    with own_vhost(amqp) as url:
        settings = Settings(
            home_dir=tmp_path / ".tasklab",
            worker_concurrency=2,
            database_url=postgres_url,
            broker_url=url,
        )
        data = _soak_holds(settings, console)
    assert data["params"]["links"], "the outage went through the proxy"


def _soak_holds(settings: Settings, console: Console) -> dict[str, Any]:
    before = alive_children()
    sizes = replace(DrillSizes(), soak=SoakSizes.tiny())
    # Knobs given for the other drills must not reach the soak: it runs the defaults.
    result = run_drill(
        settings, scenarios=["soak"], sizes=sizes, knobs=RecoveryKnobs(), console=console
    )
    data = read_json(result.path)
    f = data["figures"]
    notes = data["notes"]

    # The ledger: everything accepted ended once, with its effect once.
    assert f["soak.lost"] == 0, notes
    assert f["soak.stuck"] == 0, notes
    assert f["soak.duplicate_effects"] == 0, notes
    assert f["soak.missing_effects"] == 0, notes
    assert f["soak.unexpected_cancelled"] == 0, notes
    assert f["soak.balanced"] == 1
    assert f["soak.succeeded"] + f["soak.cancelled"] + f["soak.dead"] >= f["soak.accepted"]
    assert f["soak.effects"] == f["soak.succeeded"]
    assert f["soak.refused"] == 0

    # Offered open loop above what the workers do.
    assert f["soak.offered_per_s"] == pytest.approx(1.5 * f["soak.capacity_per_s"])
    assert f["soak.offered"] >= 10 * SoakSizes.tiny().offer_s

    # The faults happened as planned.
    assert f["soak.faults_missed"] == 0, notes
    assert f["soak.outage_s"] >= SoakSizes.tiny().outage_s
    assert f["soak.kills_worker"] == 1
    assert f["soak.worker_kill_running"] >= 1 and f["soak.worker_kill_reserved"] >= 1
    assert f["soak.worker_kill_messages"] >= 1
    assert f["soak.kills_submitter"] == 1 and f["soak.submitter_unpublished"] >= 1
    for kind in ("queued", "running", "terminate"):
        assert f[f"soak.cancel_{kind}_applied"] >= 1, (kind, notes)
    assert f["soak.cancelled"] == sum(
        f[f"soak.cancel_{k}_applied"] for k in ("queued", "running", "terminate")
    )
    assert f["soak.carried"] >= 3
    assert f["soak.worker_running_jobs"] >= 1 and f["soak.relay_jobs"] >= 1

    # Judged, figures and targets: the bound is a target (not asserted: it is what the
    # drill measures), the correctness ones passed.
    for name in ("lost", "stuck", "duplicate_effects", "missing_effects", "faults_missed"):
        assert slo(data, f"soak.{name}")["pass"] is True, name
    assert slo(data, "soak.over_bound")["value"] == f["soak.over_bound"]
    defaults = Settings.model_fields
    assert f["soak.recovery_bound_s"] == sum(
        float(defaults[k].default) for k in ("lease_s", "requeue_after_s", "reaper_interval_s")
    )
    carriers = {r["carrier"] for r in data["tables"]["soak carriers"]}
    assert {"worker_running", "worker_reserved", "relay"} <= carriers
    assert data["tables"]["ledger"][0]["drill"] == "soak"

    # Production defaults, not the drills' knobs.
    soak = data["params"]["soak"]
    assert soak["changed_from_defaults"] == []
    assert soak["production"] == {k: Settings.model_fields[k].default for k in PRODUCTION_KNOBS}
    assert data["settings"]["lease_s"] == Settings.model_fields["lease_s"].default
    assert data["settings"]["worker_prefetch_multiplier"] == 4
    assert alive_children() <= before, "a worker, the submitter or Redis outlived the soak"
    return data


def test_soak_is_a_drill_of_its_own_and_of_all_with_its_targets() -> None:
    names = {t.figure for t in default_targets(["soak"])}
    assert names == {
        f"soak.{n}"
        for n in (
            "lost",
            "duplicate_effects",
            "missing_effects",
            "stuck",
            "over_bound",
            "unexpected_cancelled",
            "faults_missed",
        )
    }
    assert "kill.missing_effects" in {t.figure for t in default_targets(["kill"])}
    output = CliRunner().invoke(app, ["drill", "--help"]).output
    assert "soak" in output and "--short" in output


def test_with_a_broker_it_does_not_own_the_soak_runs_and_flush_is_refused(
    tmp_path: Path, console: Console
) -> None:
    """It picks its own: stop on the lab's Redis, else outage through the stack's proxy."""
    from tasklab.lab.errors import LabError

    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url="redis://127.0.0.1:9/0")
    with pytest.raises(LabError, match="flush stops and restarts the broker"):
        run_drill(settings, scenarios=["soak", "flush"], console=console)
