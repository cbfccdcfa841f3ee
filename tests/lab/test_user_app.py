"""The lab against a separate, plain Celery app (examples/user_app) via ``--app``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from tasklab.lab.bench import BenchSizes, run_bench
from tasklab.lab.harness import WorkerConfig
from tasklab.lab.stress import StressSizes, run_stress
from tasklab.lab.tune import analyse_workers, run_tune
from tasklab.processes import die_with_parent, kill_tree
from tasklab.settings import Settings
from tests.lab.helpers import read_json

REPO = Path(__file__).resolve().parents[2]
APP = "examples.user_app.celery_app:app"


@pytest.fixture
def user_app_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The example app's broker (the session's embedded Redis), importable from anywhere."""
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", redis_url)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    monkeypatch.syspath_prepend(str(REPO))
    return redis_url


@pytest.fixture
def user_app_worker(user_app_env: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A examples.user_app.celery_app:app worker``, started the way its owner would."""
    from examples.user_app.celery_app import app

    log = (tmp_path / "user-worker.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APP,
            "worker",
            "--concurrency",
            "2",
            "--hostname",
            "user@%h",
            "--loglevel",
            "INFO",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + 60
    # limit=1: back at the first reply, not at the end of the timeout
    while not any("user@" in n for r in (app.control.ping(timeout=0.5, limit=1) or []) for n in r):
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "user-worker.log"
        ).read_text()[-3000:]
    yield proc
    kill_tree(proc.pid, timeout_s=10)
    proc.wait()
    log.close()


def test_stress_and_bench_run_against_the_running_workers_of_a_separate_celery_app(
    user_app_worker: subprocess.Popen[bytes], tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab")
    sizes = StressSizes.tiny()
    stress = run_stress(
        settings,
        scenarios=["fast", "failures"],
        sizes=sizes,
        app_spec=APP,
        external_workers=True,
        console=console,
    )
    data = read_json(stress.path)
    f = data["figures"]
    assert data["params"]["via"] == "celery" and data["params"]["app"] == APP
    assert f["fast.succeeded"] == sizes.fast_n and f["fast.throughput_per_s"] > 0
    assert f["fast.queue_wait_ms_p95"] >= 0 and f["fast.run_ms_p95"] > 0  # each task ran
    assert f["failures.failed"] == round(sizes.failures_n * sizes.failures_share)
    assert f["failures.outcome_match_pct"] == 100 and f["failures.ledger_lost"] == 0
    assert f["fast.rss_end_mb"] > 0  # the external worker's processes, found via inspect stats

    bench = run_bench(
        settings,
        dimensions=["submit", "execute", "jobs"],
        app_spec=APP,
        sizes=BenchSizes.tiny(),
        external_workers=True,
        console=console,
    )
    data = read_json(bench.path)
    assert data["figures"]["submit.celery_submit_ms_p50"] > 0
    assert data["figures"]["execute.celery_execute_per_s"] > 0
    assert not any(name.startswith("submit.jobs") for name in data["figures"])
    assert any("jobs: needs tasklab's own stack" in n for n in data["notes"])
    assert user_app_worker.poll() is None  # the lab left the user's worker running

    # tune's analysis sees the running worker through inspect stats/conf.
    from examples.user_app.celery_app import app

    rows, risks = analyse_workers(app)
    mine = [r for r in rows if r["worker"].startswith("user@")]
    assert mine and mine[0]["pool"] == "prefork" and mine[0]["concurrency"] == 2
    assert mine[0]["processed"] > 0 and risks == []


@pytest.mark.long  # tune's trials are tested on the embedded app (test_tune.py), a user app's
# workers by the stress-and-bench test above
def test_stress_and_tune_start_the_separate_apps_own_workers_with_celery_a(
    user_app_env: str, tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab")
    stress = run_stress(
        settings,
        scenarios=["priority"],
        app_spec=APP,
        console=console,
        sizes=StressSizes(priority_n=12, priority_task_s=0.01, timeout_s=60),
    )
    assert read_json(stress.path)["figures"]["priority.succeeded"] == 12

    grid = [WorkerConfig("threads", 2, 1)]
    result = run_tune(
        settings,
        app_spec=APP,
        task="user_app.thumbnail",
        task_args=[8],
        grid=grid,
        burst_n=8,
        load_s=0.3,
        rate_per_s=20,
        budget_s=120,
        targets=["tune.best_queue_wait_ms_p95=60000"],
        console=console,
    )
    data = read_json(result.path)
    assert data["params"]["workload"] == "user_app.thumbnail"
    # The app's own config is analysed: the example sets late acks safely, so no risk there.
    assert not [r for r in data["tables"]["risks"] if r["where"] == "app config"]
    measured = [t for t in data["tables"]["trials"] if t["status"] == "measured"]
    assert len(measured) == 2  # the baseline from settings, then the grid
    assert all(t["throughput_per_s"] > 0 for t in measured)
    logs = list((settings.home_dir / "lab" / "logs").glob("*.log"))
    assert logs and any("user_app.thumbnail" in p.read_text() for p in logs)
