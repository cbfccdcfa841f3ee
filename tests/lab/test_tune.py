from __future__ import annotations

import random
from pathlib import Path

import pytest
from rich.console import Console

from tasklab.celery_app import make_celery
from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.progress import lab_progress
from tasklab.lab.tune import (
    Sweep,
    Trial,
    app_conf,
    config_risks,
    default_grid,
    parse_grid,
    parse_task_args,
    recommend,
    run_tune,
    workload_probe,
    write_config,
)
from tasklab.lab.tune_verify import Verification, verify
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json

SAFE = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "task_time_limit": 300,
    "broker_url": "redis://x",
    "broker_transport_options": {"visibility_timeout": 7200},
    "worker_prefetch_multiplier": 1,
    "result_backend": "redis://x",
    "result_expires": 3600,
    "worker_max_tasks_per_child": 1000,
}


def risky(**changes: object) -> set[str]:
    return {r.setting for r in config_risks({**SAFE, **changes})}


def test_tasklabs_own_celery_config_has_no_risky_setting() -> None:
    assert config_risks(app_conf(make_celery(Settings(redis_url="redis://x:6379/0")))) == []
    assert risky() == set()


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"task_reject_on_worker_lost": False}, "task_reject_on_worker_lost"),
        ({"broker_transport_options": {"visibility_timeout": 60}}, "visibility_timeout"),
        ({"broker_transport_options": {}, "task_time_limit": 7200}, "visibility_timeout"),
        ({"worker_prefetch_multiplier": 32}, "worker_prefetch_multiplier"),
        ({"result_expires": None}, "result_expires"),
        ({"worker_max_tasks_per_child": None}, "worker_max_tasks_per_child"),
    ],
)
def test_each_risky_setting_is_flagged(changes: dict[str, object], setting: str) -> None:
    assert risky(**changes) == {setting}


def test_prefetch_is_a_risk_once_tasks_are_long() -> None:
    risks = config_risks({**SAFE, "worker_prefetch_multiplier": 4}, long_task_s=2.0)
    assert [r.setting for r in risks] == ["worker_prefetch_multiplier"]
    assert "use 1" in risks[0].message
    assert config_risks({**SAFE, "worker_prefetch_multiplier": 4}, long_task_s=0.01) == []


def trial(pool: str, concurrency: int, prefetch: int, throughput: float, p95_ms: float) -> Trial:
    return Trial(
        WorkerConfig(pool, concurrency, prefetch),
        status="measured",
        throughput_per_s=throughput,
        latency_ms_p95=p95_ms,
        success_pct=100.0,
        rate_per_s=50.0,
    )


def test_the_recommendation_is_the_fastest_configuration_that_meets_the_slo() -> None:
    trials = [
        trial("prefork", 2, 4, 300, 20),
        trial("prefork", 2, 1, 280, 15),
        trial("threads", 4, 1, 900, 250),
        trial("threads", 4, 4, 500, 60),
    ]
    rec = recommend(trials, slo_ms=100, baseline=WorkerConfig("prefork", 2, 4))
    assert rec.config == WorkerConfig("threads", 4, 4) and rec.meets_slo
    assert "3 of 4 configurations" in rec.reasons[0]
    assert any(r.startswith("+67 % throughput against the current settings") for r in rec.reasons)
    assert any(r.startswith("prefetch 4 vs 1") for r in rec.reasons)


def test_a_runner_up_within_five_percent_is_called_equal() -> None:
    rec = recommend([trial("prefork", 4, 4, 500, 20), trial("threads", 4, 4, 490, 20)], slo_ms=100)
    assert rec.config == WorkerConfig("prefork", 4, 4)
    assert any(r.startswith("threads x4, prefetch 4 is within 2 %") for r in rec.reasons)


def test_without_a_configuration_meeting_the_slo_the_closest_one_is_named() -> None:
    rec = recommend(
        [trial("prefork", 2, 4, 300, 400), trial("threads", 4, 1, 900, 250)], slo_ms=100
    )
    assert rec.config == WorkerConfig("threads", 4, 1) and not rec.meets_slo
    assert rec.reasons[0].startswith("no configuration kept P95 queue wait within 100 ms")


def test_the_default_grid_crosses_pools_concurrency_and_prefetch() -> None:
    grid = default_grid(2)
    assert len(grid) == 8 and {c.pool for c in grid} == {"prefork", "threads"}
    assert {c.concurrency for c in grid} == {2, 4}
    assert {c.prefetch_multiplier for c in grid} == {1, 4}


def test_a_recommendation_is_written_as_an_env_file_or_a_celery_config_module(
    tmp_path: Path,
) -> None:
    config = WorkerConfig("threads", 8, 1)
    env = write_config(tmp_path / "worker.env", config, comment="why")
    assert env.read_text().splitlines()[1:] == [
        "TASKLAB_WORKER_POOL=threads",
        "TASKLAB_WORKER_CONCURRENCY=8",
        "TASKLAB_WORKER_PREFETCH_MULTIPLIER=1",
    ]
    module = write_config(tmp_path / "celeryconfig.py", config, comment="why")
    namespace: dict[str, object] = {}
    exec(compile(module.read_text(), str(module), "exec"), namespace)
    assert (
        namespace["worker_pool"],
        namespace["worker_concurrency"],
        namespace["worker_prefetch_multiplier"],
    ) == ("threads", 8, 1)


def test_tune_measures_each_configuration_and_writes_the_best_one(
    lab_settings: Settings, console: Console, tmp_path: Path
) -> None:
    grid = [WorkerConfig("prefork", 2, 4), WorkerConfig("threads", 4, 1)]
    result = run_tune(
        lab_settings,
        workload="io",
        grid=grid,
        burst_n=12,
        load_s=0.5,
        rate_per_s=20,
        budget_s=120,
        write=tmp_path / "tuned.env",
        targets=["tune.best_queue_wait_ms_p95=60000"],
        console=console,
        repeat=0,  # the sweep's pick, unverified (verification: its own test)
    )
    data = read_json(result.path)

    trials = data["tables"]["trials"]
    assert [(t["pool"], t["status"]) for t in trials] == [
        ("prefork", "measured"),
        ("threads", "measured"),
    ]
    assert all(t["throughput_per_s"] > 0 and t["rate_per_s"] == 20 for t in trials)
    rec = data["tables"]["recommendation"][0]
    assert rec["meets_slo"] is True and rec["reasons"]
    assert data["params"]["slo_queue_wait_ms_p95"] == 60000
    assert data["figures"]["tune.trials_measured"] == 2
    assert data["figures"]["system.cores"] >= 1 and data["figures"]["workers.running"] == 0
    written = (tmp_path / "tuned.env").read_text()
    assert f"TASKLAB_WORKER_POOL={rec['pool']}" in written
    assert "tasklab tune: trials" in printed(console)


def test_a_spent_time_budget_skips_the_remaining_trials(
    lab_settings: Settings, console: Console
) -> None:
    grid = [WorkerConfig("threads", 2, 1)] * 5
    result = run_tune(
        lab_settings,
        workload="io",
        grid=grid,
        burst_n=6,
        load_s=0.3,
        rate_per_s=20,
        budget_s=0.0,
        console=console,
    )
    data = read_json(result.path)
    assert {t["status"] for t in data["tables"]["trials"]} == {"skipped"}
    assert data["tables"]["recommendation"][0]["meets_slo"] is False


def test_the_cli_grid_is_read_from_comma_separated_lists() -> None:
    grid = parse_grid(pools="threads", concurrencies="4, 16", prefetches="1", cores=2)
    assert grid == [WorkerConfig("threads", 4, 1), WorkerConfig("threads", 16, 1)]
    assert len(parse_grid(cores=2)) == 8
    with pytest.raises(LabError, match="unknown pool"):
        parse_grid(pools="gevent")
    with pytest.raises(LabError, match="comma-separated"):
        parse_grid(concurrencies="2,many")


def test_task_arguments_are_json() -> None:
    assert parse_task_args('[64, "x"]') == [64, "x"]
    assert parse_task_args("64") == [64] and parse_task_args(None) == []
    with pytest.raises(LabError, match="JSON list"):
        parse_task_args("[64")


def test_a_recommendation_is_re_measured_against_the_current_settings_before_it_is_given(
    lab_settings: Settings, console: Console, tmp_path: Path
) -> None:
    baseline = WorkerConfig.from_settings(lab_settings)
    with LabStack(lab_settings, workers="none") as stack, lab_progress(console) as progress:
        sweep = Sweep(stack, workload_probe("io"), progress, burst_n=8, load_s=0.3, rate_per_s=20)
        found = verify(
            sweep, baseline, WorkerConfig("threads", 4, 1), repeat=2, rng=random.Random(1)
        )
    assert sorted((r["round"], r["role"]) for r in found.rows) == [
        (1, "baseline"),
        (1, "candidate"),
        (2, "baseline"),
        (2, "candidate"),
    ]
    assert all(r["throughput_per_s"] > 0 for r in found.rows)
    figures = found.figures()
    assert figures["verify_rounds"] == 2
    assert (
        figures["verified_gain_pct_min"]
        <= figures["verified_gain_pct"]
        <= figures["verified_gain_pct_max"]
    )
    base, cand = found.throughputs(baseline), found.throughputs(WorkerConfig("threads", 4, 1))
    assert found.beyond_noise is (min(cand) > max(base))
    assert found.verdict().startswith("verified" if found.beyond_noise else "no difference")


def test_a_gain_inside_the_noise_recommends_nothing() -> None:
    base, cand = WorkerConfig("prefork", 2, 4), WorkerConfig("threads", 4, 1)
    found = Verification(base, cand)
    for n, (b, c) in enumerate([(100.0, 110.0), (105.0, 98.0), (95.0, 104.0)], start=1):
        found.rows += [
            {"round": n, "config": base.label(), "throughput_per_s": b},
            {"round": n, "config": cand.label(), "throughput_per_s": c},
        ]
    assert found.beyond_noise is False
    assert found.verdict().startswith("no difference beyond noise")
    assert "nothing is recommended" in found.verdict()
    found.rows = [r for r in found.rows if r["round"] == 1]
    assert found.beyond_noise is True
    assert found.figures()["verified_gain_pct"] == pytest.approx(10.0)
