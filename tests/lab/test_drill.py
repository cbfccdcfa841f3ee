"""Every drill on embedded defaults with tiny sizes: the ledger after the fault — nothing lost,
no effect twice — and the JSON's shape. Never the speed of recovery."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from tasklab.lab.drill import DrillSizes, RecoveryKnobs, recover_s, run_drill
from tasklab.lab.errors import LabError
from tasklab.lab.workload import Sample
from tasklab.settings import Settings, mask_url
from tests.conftest import required_url
from tests.lab.helpers import printed, read_json, slo
from tests.support.rabbitmq import own_vhost

SIZES = DrillSizes.tiny()


def alive_children() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE
    }


def assert_ledger_holds(figures: dict[str, float], drill: str) -> None:
    assert figures[f"{drill}.lost"] == 0
    assert figures[f"{drill}.duplicate_effects"] == 0
    assert figures[f"{drill}.accepted"] == figures[f"{drill}.submitted"]
    assert figures[f"{drill}.succeeded"] == figures[f"{drill}.accepted"]
    assert figures[f"{drill}.effects"] == figures[f"{drill}.succeeded"]


def test_recovery_lasts_from_the_end_of_the_fault_to_the_last_affected_job_finishing() -> None:
    samples = [
        Sample("done-before", "succeeded", sent_at=1.0, finished_at=9.0),  # not affected
        Sample("through", "succeeded", sent_at=5.0, finished_at=31.0),
        Sample("during", "succeeded", sent_at=15.0, finished_at=24.0),
        Sample("after", "succeeded", sent_at=21.0, finished_at=40.0),  # sent after: not
    ]
    assert recover_s(samples, fault_start=10.0, fault_end=20.0) == 11.0
    assert recover_s(samples[:1], fault_start=10.0, fault_end=20.0) == 0.0
    early = [Sample("early", "succeeded", sent_at=15.0, finished_at=18.0)]
    assert recover_s(early, fault_start=10.0, fault_end=20.0) == 0.0  # done before the end


def test_a_worker_sigkilled_mid_task_loses_no_job_and_repeats_no_effect(
    lab_settings: Settings, console: Console
) -> None:
    before = alive_children()
    result = run_drill(lab_settings, scenarios=["kill"], sizes=SIZES, console=console)
    data = read_json(result.path)
    f = data["figures"]

    assert_ledger_holds(f, "kill")
    assert f["kill.submitted"] == SIZES.kill_jobs
    assert f["kill.kills"] == SIZES.kills == 2 and f["kill.interrupted"] >= 2
    assert f["kill.kills_worker"] == 1 and f["kill.kills_pool_process"] == 1
    assert f["kill.balanced"] == 1
    assert data["params"]["recovery"] == asdict(RecoveryKnobs())
    assert data["settings"]["lease_s"] == RecoveryKnobs().lease_s
    assert data["settings"]["worker_prefetch_multiplier"] == 1
    assert data["tables"]["ledger"][0]["drill"] == "kill"
    assert slo(data, "kill.lost") == {
        "figure": "kill.lost",
        "value": 0,
        "target": 0,
        "op": "==",
        "pass": True,
    }
    assert slo(data, "kill.duplicate_effects")["pass"] is True
    # a kill drill that interrupted nothing fails (jobs wait as PENDING before QUEUED)
    assert slo(data, "kill.interrupted")["op"] == ">=" and slo(data, "kill.interrupted")["pass"]
    assert "kill.recover_s" in printed(console)
    assert alive_children() <= before, "a worker or Redis outlived the drill"


def test_jobs_submitted_through_a_broker_outage_run_locally_or_later_and_none_is_lost(
    lab_settings: Settings, console: Console
) -> None:
    result = run_drill(lab_settings, scenarios=["outage"], sizes=SIZES, console=console)
    f = read_json(result.path)["figures"]

    assert_ledger_holds(f, "outage")
    assert f["outage.refused"] == 0
    assert f["outage.outage_s"] >= SIZES.outage_s
    assert f["outage.submitted_during_outage"] >= 1
    assert f["outage.via_local"] >= 1  # the fallback ran what the broker could not take
    assert f["outage.via_local"] + f["outage.via_broker"] == f["outage.accepted"]


def test_jobs_submitted_through_a_blackholed_link_to_a_redis_the_lab_does_not_own_run_once(
    tmp_path: Path, redis_url: str, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url=redis_url, worker_concurrency=2)
    result = run_drill(
        settings, scenarios=["outage"], sizes=SIZES, console=console, fault="blackhole"
    )
    data = read_json(result.path)
    f = data["figures"]

    assert data["params"]["broker_fault"] == "blackhole"
    assert_ledger_holds(f, "outage")
    assert f["outage.refused"] == 0 and slo(data, "outage.refused")["pass"]
    assert f["outage.outage_s"] >= SIZES.outage_s
    assert f["outage.submitted_during_outage"] >= 1


@pytest.mark.rabbitmq
def test_an_outage_drill_on_rabbitmq_cuts_its_link_and_loses_no_job(
    tmp_path: Path, console: Console
) -> None:
    with own_vhost(required_url("TEST_RABBITMQ_URL")) as url:
        settings = Settings(home_dir=tmp_path / ".tasklab", broker_url=url, worker_concurrency=2)
        result = run_drill(settings, scenarios=["outage"], sizes=SIZES, console=console)
    data = read_json(result.path)
    f = data["figures"]

    assert data["params"]["broker"] == mask_url(url)  # the server, not the proxy in between
    assert data["params"]["broker_fault"] == "outage"  # a broker URL: by proxy
    assert data["params"]["links"]["broker"].endswith("-> 127.0.0.1:5672")
    assert data["versions"]["server.rabbitmq"]  # the version the broker announced
    assert_ledger_holds(f, "outage")
    assert f["outage.refused"] == 0
    assert f["outage.via_local"] >= 1  # publishes into the reset link failed over


def test_jobs_queued_in_a_broker_restarted_empty_are_all_run_once(
    lab_settings: Settings, console: Console
) -> None:
    result = run_drill(lab_settings, scenarios=["flush"], sizes=SIZES, console=console)
    f = read_json(result.path)["figures"]

    assert_ledger_holds(f, "flush")
    assert f["flush.submitted"] == SIZES.flush_jobs
    assert 0 <= f["flush.waiting_at_flush"] <= SIZES.flush_jobs


def test_orders_of_an_api_killed_during_its_local_fallback_all_settle_once(
    lab_settings: Settings, console: Console
) -> None:
    before = alive_children()
    result = run_drill(lab_settings, scenarios=["api"], sizes=SIZES, console=console)
    data = read_json(result.path)
    f = data["figures"]

    assert f["api.accepted"] >= SIZES.api_orders
    assert f["api.accepted"] == f["api.submitted"]  # every unanswered request was retried
    assert f["api.unanswered_left"] == 0 and f["api.refused"] == 0
    assert f["api.lost"] == 0 and f["api.orders_pending"] == 0
    assert f["api.duplicate_effects"] == 0
    assert f["api.succeeded"] == f["api.accepted"]
    assert f["api.effects"] == f["api.paid"]  # one points-ledger row per paid order
    assert f["api.invariant_violations"] == 0
    assert f["api.sync_jobs"] == SIZES.api_sync_batches
    assert slo(data, "api.invariant_violations")["pass"] is True
    assert alive_children() <= before, "the API, a worker or Redis outlived the drill"


def test_an_unknown_drill_is_refused_before_anything_starts(
    lab_settings: Settings, console: Console
) -> None:
    with pytest.raises(LabError, match="unknown drill"):
        run_drill(lab_settings, scenarios=["kill", "meteor"], console=console)
    assert not lab_settings.results_dir.exists()


def test_drills_that_stop_the_broker_refuse_a_broker_they_do_not_own(
    tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url="redis://127.0.0.1:9/0")
    with pytest.raises(LabError, match="embedded Redis"):
        run_drill(settings, scenarios=["kill", "flush"], sizes=SIZES, console=console)
    with pytest.raises(LabError, match="outage stops and restarts the broker"):
        run_drill(settings, scenarios=["outage"], sizes=SIZES, console=console, fault="stop")
    assert not settings.results_dir.exists()


def test_a_broker_fault_a_drill_cannot_make_is_refused_before_anything_starts(
    lab_settings: Settings, console: Console
) -> None:
    with pytest.raises(
        LabError, match="api cannot make a broker blackhole; it makes: stop, outage"
    ):
        run_drill(lab_settings, scenarios=["api"], console=console, fault="blackhole")
    with pytest.raises(LabError, match="unknown broker fault 'flood'"):
        run_drill(lab_settings, scenarios=["outage"], console=console, fault="flood")
    assert not lab_settings.results_dir.exists()
