"""``tasklab drill partition``: a node cut off from the broker and the database by a black hole
is taken over, notices, records nothing twice, and comes back by itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from tasklab.lab.drill import DrillSizes, run_drill
from tasklab.lab.errors import LabError
from tasklab.lab.partition import PartitionSizes, notice_bound_s, takeover_bound_s
from tasklab.settings import Settings
from tests.lab.helpers import read_json
from tests.support.rabbitmq import own_vhost

# Short knobs so that the cut lasts seconds; the full drill runs on the defaults (docs/lab.md).
KNOBS = {
    "lease_s": 5.0,
    "reaper_interval_s": 1.0,
    "link_check_interval_s": 1.0,
    "link_timeout_s": 1.0,
    "link_fail_after": 2,
    "worker_concurrency": 1,
}
SIZES = PartitionSizes(hold_s=0.3, cut_after_s=4.0, cut_s=10.0, after_s=15.0, drain_timeout_s=90)


def test_the_partition_drill_refuses_a_sqlite_database(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="DATABASE_URL"):
        run_drill(Settings(home_dir=tmp_path), scenarios=["partition"])


def _run(settings: Settings, console: Console) -> dict[str, float]:
    result = run_drill(
        settings,
        scenarios=["partition"],
        sizes=DrillSizes(partition=SIZES),
        console=console,
    )
    figures: dict[str, float] = read_json(result.path)["figures"]
    failed = [(s.figure, s.value) for s in result.slos if not s.passed]
    assert result.passed, (failed, figures)
    return figures


def _check(f: dict[str, float], settings: Settings) -> None:
    assert f["partition.held"] >= 1
    assert f["partition.taken_over"] == f["partition.held"]
    assert 0 < f["partition.takeover_s_max"] <= takeover_bound_s(settings)
    # the lease must run out first: nobody takes a job over while its lease is live
    assert f["partition.takeover_s_max"] >= settings.lease_s * 0.5
    for link in ("broker", "database"):
        assert 0 < f[f"partition.noticed_{link}_s"] <= notice_bound_s(settings)
    assert f["partition.cut_node_jobs_after_heal"] >= 1
    assert f["partition.lost"] == f["partition.duplicate_effects"] == 0
    assert f["partition.missing_effects"] == f["partition.stuck"] == 0


@pytest.mark.postgres
@pytest.mark.slow
def test_a_node_cut_off_from_redis_and_postgresql_is_taken_over_and_comes_back(
    postgres_url: str, tmp_path: Path, console: Console
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab", database_url=postgres_url, **KNOBS)
    _check(_run(settings, console), settings)


@pytest.mark.postgres
@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.long
def test_a_node_cut_off_from_rabbitmq_and_postgresql_is_taken_over_and_comes_back(
    postgres_url: str, tmp_path: Path, console: Console
) -> None:
    amqp = os.environ.get("TEST_RABBITMQ_URL")
    if not amqp:
        pytest.skip("TEST_RABBITMQ_URL is not set (make test sets it when RabbitMQ answers)")
    with own_vhost(amqp) as url:  # tasklab's queue names meet no other test's
        settings = Settings(
            home_dir=tmp_path / ".tasklab", database_url=postgres_url, broker_url=url, **KNOBS
        )
        _check(_run(settings, console), settings)
