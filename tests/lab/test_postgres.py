"""The lab on PostgreSQL (``DATABASE_URL`` set): durable jobs, their ledger and issue 3's bench."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from tasklab.lab.bench import BenchSizes, run_bench
from tasklab.lab.stress import StressSizes, run_stress
from tasklab.settings import Settings
from tests.lab.helpers import read_json


@pytest.mark.postgres
def test_stress_failures_and_bench_jobs_run_on_postgresql(
    postgres_url: str, tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab", database_url=postgres_url)
    stress = run_stress(settings, scenarios=["failures"], sizes=StressSizes.tiny(), console=console)
    f = read_json(stress.path)["figures"]
    assert f["failures.ledger_lost"] == 0 and f["failures.ledger_duplicate_effects"] == 0
    assert f["failures.outcome_match_pct"] == 100

    bench = run_bench(settings, dimensions=["jobs"], sizes=BenchSizes.tiny(), console=console)
    data = read_json(bench.path)
    assert data["versions"]["server.postgresql"].split(".")[0].isdigit()
    assert data["settings"]["database_url"].startswith("postgresql://")
    assert data["figures"]["jobs.tasklab_succeeded"] == BenchSizes.tiny().jobs_n
    assert not (settings.home_dir / "lab" / "tasklab.db").exists()  # no scratch SQLite
