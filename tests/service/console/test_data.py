"""The console's figures from the job records, on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest

from tasklab.database import make_engine
from tasklab.service.console import data
from tasklab.settings import Settings
from tests.service.console.conftest import insert_jobs


@pytest.fixture
def console_database(database_url: str | None) -> str | None:
    return database_url


def test_throughput_and_queue_wait_are_counted_per_minute_over_the_last_hour(
    console_settings: Settings,
) -> None:
    now = time.time()
    insert_jobs(
        console_settings,
        [
            {"finished_at": now - 5, "queued_at": now - 20, "started_at": now - 19},  # waited 1 s
            {"finished_at": now - 6, "queued_at": now - 20, "started_at": now - 17},  # 3 s
            {"finished_at": now - 7, "queued_at": now - 20, "started_at": now - 11},  # 9 s
            {"finished_at": now - 125, "queued_at": now - 200, "started_at": now - 196},  # 4 s
            {"status": "DEAD", "finished_at": now - 130},
            {"finished_at": now - 4000},  # over an hour ago: in neither
        ],
    )
    engine = make_engine(console_settings)
    try:
        with engine.connect() as conn:
            series = data.throughput_per_minute(conn, now=now)
            waits = data.queue_wait_per_minute(conn, now=now)
            last_minute = data.finished_last_minute(conn, now=now)
    finally:
        engine.dispose()
    succeeded = dict(series["SUCCEEDED"])
    assert len(succeeded) == 60 and succeeded[0.0] == 3 and succeeded[-2.0] == 1
    assert sum(succeeded.values()) == 4 and dict(series["DEAD"])[-2.0] == 1
    assert dict(waits["p50"]) == {-2.0: 4.0, 0.0: 3.0}
    assert dict(waits["p95"])[0.0] == 9.0
    assert last_minute == {"default": {"SUCCEEDED": 3}}
