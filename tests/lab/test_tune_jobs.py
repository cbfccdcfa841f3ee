"""``tasklab tune --dimension jobs``: the durable-jobs path's knobs (pool, concurrency,
prefetch, bundle_max), measured on a real stack and verified as tune verifies."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig
from tasklab.lab.progress import lab_progress
from tasklab.lab.results import LabResult
from tasklab.lab.tune import run_tune, write_config
from tasklab.lab.tune_jobs import (
    JobsSweep,
    default_jobs_grid,
    jobs_baseline,
    jobs_probe,
    parse_jobs_grid,
)
from tasklab.lab.tune_recommend import Recommendation, recommend
from tasklab.lab.tune_sweep import JobsConfig, Trial
from tasklab.lab.tune_verify import Verification, judged, verify
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json

FIGURES = ("throughput_per_s", "queue_wait_ms_p95", "rate_per_s", "duration_s", "success_pct")


def test_the_jobs_grid_crosses_the_worker_knobs_with_bundle_max() -> None:
    settings = Settings(bundle_max=16, worker_prefetch_multiplier=4)
    grid = default_jobs_grid(settings, cores=2)
    assert len(grid) == 12 and {c.bundle_max for c in grid} == {1, 16, 64}
    assert {c.pool for c in grid} == {"prefork", "threads"}
    assert {c.concurrency for c in grid} == {2, 4} and {c.prefetch_multiplier for c in grid} == {4}
    assert jobs_baseline(settings) == JobsConfig("prefork", os.cpu_count() or 1, 4, 1, 16)
    parsed = parse_jobs_grid(
        settings, pools="threads", concurrencies="4", prefetches="1,4", bundles="1,32", cores=2
    )
    assert parsed == [
        JobsConfig("threads", 4, 1, bundle_max=1),
        JobsConfig("threads", 4, 1, bundle_max=32),
        JobsConfig("threads", 4, 4, bundle_max=1),
        JobsConfig("threads", 4, 4, bundle_max=32),
    ]
    for bad in ({"bundles": "0"}, {"bundles": "2000"}, {"bundles": "many"}, {"prefetches": "0"}):
        with pytest.raises(LabError):
            parse_jobs_grid(settings, **bad)
    with pytest.raises(LabError, match="for --dimension jobs"):
        jobs_probe("cpu")


def test_the_recommendation_names_what_bundle_max_alone_changed(tmp_path: Path) -> None:
    def measured(bundle: int, throughput: float) -> Trial:
        return Trial(
            JobsConfig("prefork", 2, 4, bundle_max=bundle),
            status="measured",
            throughput_per_s=throughput,
            latency_ms_p95=20.0,
            success_pct=100.0,
            rate_per_s=50.0,
        )

    rec = recommend([measured(1, 300), measured(16, 900)], slo_ms=100)
    assert rec.config == JobsConfig("prefork", 2, 4, bundle_max=16)
    assert any(r.startswith("bundle_max 16 vs 1: 900 vs 300") for r in rec.reasons)
    written = write_config(tmp_path / "jobs.env", rec.config, comment="why").read_text()
    assert "TASKLAB_BUNDLE_MAX=16" in written and "TASKLAB_WORKER_POOL=prefork" in written
    with pytest.raises(LabError, match="env file"):
        write_config(tmp_path / "celeryconfig.py", rec.config, comment="why")
    # a Celery-path config has no bundle line
    plain = write_config(tmp_path / "w.env", WorkerConfig("prefork", 2, 4), comment="why")
    assert "BUNDLE" not in plain.read_text()


def test_a_short_jobs_tune_run_records_its_trials_and_a_verified_verdict(
    lab_settings: Settings, console: Console, tmp_path: Path
) -> None:
    # The current settings send one message per job, so the sweep has a candidate to verify
    # (on the defaults the current bundle_max usually measures best: nothing to verify).
    settings = lab_settings.model_copy(update={"bundle_max": 1})
    out = tmp_path / "jobs.env"
    result = run_tune(
        settings,
        dimension="jobs",
        grid=[JobsConfig("prefork", 2, 4, bundle_max=b) for b in (1, 16)],
        burst_n=60,
        load_s=0.3,
        rate_per_s=20,
        budget_s=60,
        write=out,
        targets=["tune.best_queue_wait_ms_p95=60000"],
        console=console,
        repeat=2,
        seed=1,
    )
    data = read_json(result.path)
    assert data["params"]["dimension"] == "jobs" and data["params"]["workload"] == "noop"
    trials = data["tables"]["trials"]
    assert [(t["bundle_max"], t["status"]) for t in trials] == [(1, "measured"), (16, "measured")]
    for t in trials:
        assert all(t[f] > 0 for f in FIGURES), t
    assert data["figures"]["tune.trials_measured"] == 2
    rec = data["tables"]["recommendation"][0]
    verdict = rec["reasons"][-1]
    if verdict == "keep the current settings":  # the sweep found bundle 1 best: no rounds
        assert "verification" not in data["tables"] and not out.exists()
        return
    rows = data["tables"]["verification"]
    assert sorted((r["round"], r["role"]) for r in rows) == [
        (1, "baseline"),
        (1, "candidate"),
        (2, "baseline"),
        (2, "candidate"),
    ]
    assert all(r["throughput_per_s"] > 0 and r["queue_wait_ms_p95"] > 0 for r in rows)
    base = [r["throughput_per_s"] for r in rows if r["role"] == "baseline"]
    cand = [r["throughput_per_s"] for r in rows if r["role"] == "candidate"]
    if min(cand) > max(base):
        assert verdict.startswith("verified: prefork x2, prefetch 4, bundle 16")
        assert rec["bundle_max"] == 16 and "TASKLAB_BUNDLE_MAX=16" in out.read_text()
    else:
        assert verdict.startswith("no difference beyond noise")
        assert "bundle_max" not in rec and not out.exists()
    assert data["figures"]["tune.verify_rounds"] == 2
    assert "bundle" in printed(console)


def test_the_verifier_refuses_a_candidate_whose_measured_trials_overlap(
    lab_settings: Settings, console: Console
) -> None:
    baseline = JobsConfig("prefork", 2, 4, bundle_max=1)
    candidate = JobsConfig("prefork", 2, 4, bundle_max=16)
    with LabStack(lab_settings, workers="none") as stack, lab_progress(console) as progress:
        sweep = JobsSweep(
            stack, jobs_probe("noop"), progress, burst_n=40, load_s=0.3, rate_per_s=20
        )
        try:
            found = verify(sweep, baseline, candidate, repeat=2, rng=random.Random(3))
        finally:
            sweep.close()
    measured = sorted(r["throughput_per_s"] for r in found.rows)
    assert len(measured) == 4 and all(v > 0 for v in measured)
    rec = Recommendation(candidate, True, ["the sweep's pick"])

    def arranged(base: list[float], cand: list[float]) -> Recommendation:
        """The measured figures dealt to the two configurations, judged for real."""
        v = Verification(baseline, candidate)
        for n, (b, c) in enumerate(zip(base, cand, strict=True), start=1):
            v.rows += [
                {"round": n, "config": baseline.label(), "throughput_per_s": b},
                {"round": n, "config": candidate.label(), "throughput_per_s": c},
            ]
        return judged(v, rec, result=LabResult("tune"))

    lo, mid_lo, mid_hi, hi = measured
    overlapping = arranged([lo, mid_hi], [mid_lo, hi])  # candidate's worst below base's best
    assert overlapping.config is None
    assert overlapping.reasons[-1].startswith("no difference beyond noise")
    apart = arranged([lo, mid_lo], [mid_hi, hi])
    if mid_hi > mid_lo:  # distinct figures: every candidate trial beat every baseline trial
        assert apart.config == candidate and apart.reasons[-1].startswith("verified")


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasklab", "tune", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TASKLAB_HOME_DIR": str(home)},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--dimension", "fast"), "--dimension"),
        (("--dimension", "jobs", "--bundle-max", "0"), "--bundle-max"),
        (("--dimension", "jobs", "--bundle-max", "1,x"), "comma-separated"),
        (("--bundle-max", "16"), "--dimension jobs"),
        (("--dimension", "jobs", "--workload", "mixed"), "workload"),
        (("--dimension", "jobs", "--write", "celeryconfig.py"), "env file"),
    ],
)
def test_a_bad_jobs_tune_option_is_one_line_and_exit_code_2(
    args: tuple[str, ...], says: str, tmp_path: Path
) -> None:
    out = _cli(*args, home=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert not (tmp_path / "lab").exists()  # refused before any stack started
