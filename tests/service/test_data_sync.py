"""Data sync: the seeded CSV/JSON files are parsed by a worker job into a table, with progress
per file; bad rows and unreadable files are recorded, not crashes."""

from __future__ import annotations

from pathlib import Path

import httpx
import sqlalchemy as sa

from tasklab.database import make_engine
from tasklab.jobs import JobManager
from tasklab.service.domain.models import SyncFile, SyncRecord, SyncRowError
from tasklab.service.domain.sync import BAD_ROW_EVERY, ROWS_PER_FILE, parse_file
from tasklab.settings import Settings
from tests.service.conftest import Account, count_rows


def _files(settings: Settings, platform: str) -> list[tuple[int, str, str]]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(SyncFile.id, SyncFile.path, SyncFile.format)
            .where(SyncFile.platform == platform)
            .order_by(SyncFile.id)
        ).all()
    engine.dispose()
    return [(r.id, r.path, r.format) for r in rows]


def test_seeded_files_parse_into_good_rows_and_line_numbered_errors(
    shop_settings: Settings,
) -> None:
    (csv_id, csv_path, fmt), (json_id, json_path, json_fmt) = _files(shop_settings, "etsy")[:2]
    assert (fmt, json_fmt) == ("csv", "json")
    for file_id, path, kind in ((csv_id, csv_path, fmt), (json_id, json_path, json_fmt)):
        parsed = parse_file(file_id, Path(path), kind)
        assert len(parsed.errors) == ROWS_PER_FILE // BAD_ROW_EVERY
        assert len(parsed.records) + len(parsed.errors) == ROWS_PER_FILE
        line, message = parsed.errors[0]
        first_bad = BAD_ROW_EVERY + (1 if kind == "csv" else 0)  # CSV line 1 is the header
        assert line == first_bad and ":" in message


def test_an_unreadable_file_is_one_error_not_a_crash(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"not": "a list"')
    parsed = parse_file(7, broken, "json")
    assert parsed.records == [] and parsed.errors[0][0] == 0
    missing = parse_file(8, tmp_path / "missing.csv", "csv")
    assert "cannot read file" in missing.errors[0][1]


async def test_a_sync_batch_job_loads_the_files_with_progress_per_file(
    client: httpx.AsyncClient,
    accounts: list[Account],
    shop_settings: Settings,
    worker_factory,
    jobs: JobManager,
) -> None:
    headers = accounts[-1].headers  # data sync is for administrators
    response = await client.post(
        "/api/v1/data-sync/sync-batch",
        headers=headers,
        json={"platform": "shopify", "limit": 3, "priority": 8},
    )
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["celery_task_id"] and accepted["status"] == "QUEUED"
    single = (
        await client.post(
            "/api/v1/data-sync/sync-single-file",
            headers=headers,
            json={"file_id": _files(shop_settings, "amazon")[0][0]},
        )
    ).json()

    worker_factory(shop_settings).start()
    for job_id in (accepted["job_id"], single["job_id"]):
        jobs.wait(job_id, timeout_s=60)
    status = (
        await client.get(f"/api/v1/data-sync/task-status/{accepted['job_id']}", headers=headers)
    ).json()
    same = (await client.get(f"/api/v1/jobs/{accepted['job_id']}", headers=headers)).json()
    assert status == same
    assert status["status"] == "SUCCEEDED" and status["task"] == "tasklab.sync.sync_batch"
    assert status["queue"] == "data_sync" and status["priority"] == 8
    assert (status["progress"]["current"], status["progress"]["total"]) == (3, 3)
    result = status["result"]
    assert result["files"] == 3 and result["row_errors"] == 3 * ROWS_PER_FILE // BAD_ROW_EVERY
    assert result["rows"] + result["row_errors"] == 3 * ROWS_PER_FILE
    # the single file was synced too: 4 files' rows and errors in the tables
    assert count_rows(shop_settings, SyncRecord) == result["rows"] + (
        ROWS_PER_FILE - ROWS_PER_FILE // BAD_ROW_EVERY
    )
    assert count_rows(shop_settings, SyncRowError) == 4 * ROWS_PER_FILE // BAD_ROW_EVERY


async def test_re_syncing_a_file_replaces_its_rows(
    client: httpx.AsyncClient,
    accounts: list[Account],
    shop_settings: Settings,
    worker_factory,
    jobs: JobManager,
) -> None:
    file_id, path, _ = _files(shop_settings, "etsy")[0]
    body = {"file_id": file_id, "priority": 5}
    first = (
        await client.post(
            "/api/v1/data-sync/sync-single-file", json=body, headers=accounts[-1].headers
        )
    ).json()
    worker_factory(shop_settings).start()
    jobs.wait(first["job_id"], timeout_s=60)
    rows_once = count_rows(shop_settings, SyncRecord)
    Path(path).write_text("external_id,sku,name,price,quantity\nx-1,S1,One,1.50,2\n,S2,,x,\n")
    second = (
        await client.post(
            "/api/v1/data-sync/sync-single-file", json=body, headers=accounts[-1].headers
        )
    ).json()
    done = jobs.wait(second["job_id"], timeout_s=60)
    assert rows_once == ROWS_PER_FILE - ROWS_PER_FILE // BAD_ROW_EVERY
    assert done.result["rows"] == 1 and done.result["row_errors"] == 1
    assert count_rows(shop_settings, SyncRecord) == 1
    assert count_rows(shop_settings, SyncRowError) == 1
