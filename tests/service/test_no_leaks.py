"""What the API tells is what failed, not how: a job's database error reaches its owner
without the SQL statement or its parameters (administrators see it all); /ready names the
dependency that fails, never the exception."""

from __future__ import annotations

from pathlib import Path

import httpx
import sqlalchemy as sa
from fastapi import FastAPI

from tasklab.database import make_engine
from tasklab.jobs.records import jobs as job_records
from tasklab.service.app import create_app
from tasklab.service.domain.models import User
from tasklab.settings import Settings
from tests.service.conftest import Account, free_port, make_settings

ORDER = {"items": [{"product_id": 1, "quantity": 1}], "use_points": 0}
SECRET_VALUE = "s3cret-name-value"


def _real_integrity_error(settings: Settings) -> str:
    """The text a job records for a database error (``Type: message``), from a real one."""
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(User).values(
                    id=1, name=SECRET_VALUE, token_hash="", is_admin=False, created_at=0.0
                )
            )
    except sa.exc.IntegrityError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        engine.dispose()
    raise AssertionError("the duplicate insert did not fail")


async def test_a_jobs_database_error_reaches_its_owner_without_sql_or_parameters(
    app: FastAPI, client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings
) -> None:
    alice, admin = accounts[0], accounts[-1]
    placed = (await client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    error = _real_integrity_error(shop_settings)
    assert "[SQL:" in error and SECRET_VALUE in error
    engine = make_engine(shop_settings)
    with engine.begin() as conn:
        conn.execute(
            sa.update(job_records)
            .where(job_records.c.id == placed["job_id"])
            .values(status="DEAD", error=error)
        )
    engine.dispose()

    path = f"/api/v1/jobs/{placed['job_id']}"
    shown = (await client.get(path, headers=alice.headers)).json()["error"]
    assert shown.startswith("IntegrityError:")
    assert "[SQL:" not in shown and "parameters" not in shown and SECRET_VALUE not in shown
    listed = (await client.get("/api/v1/jobs", headers=alice.headers)).json()["items"]
    assert [j["error"] for j in listed] == [shown]
    assert (await client.get(path, headers=admin.headers)).json()["error"] == error


async def test_ready_names_a_broker_that_does_not_answer_without_the_exception(
    shop_settings: Settings,
) -> None:
    settings = shop_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        ready = (await c.get("/ready")).json()
    assert ready["status"] == "degraded"
    assert ready["checks"]["broker"] == {"ok": False, "detail": "broker unavailable"}


async def test_ready_names_a_database_that_does_not_answer_without_the_exception(
    tmp_path: Path, redis_url: str
) -> None:
    database_url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    app = create_app(make_settings(tmp_path, redis_url, database_url))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        ready = await c.get("/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["detail"] == "database unavailable"
    assert body["checks"]["database"] == {"ok": False, "detail": "database unavailable"}
    assert "Error" not in ready.text and "refused" not in ready.text
