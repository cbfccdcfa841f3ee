"""Liveness and readiness: no authentication."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import Response

from tasklab.service.deps import Services, ServicesDep
from tasklab.service.problems import documented, problem
from tasklab.service.schemas import Health, Ready

log = logging.getLogger("tasklab.service")
router = APIRouter(tags=["ops"])
_HEALTH_BODY = b'{"status":"ok"}'


@router.get("/health", response_model=Health)
async def health() -> Response:
    """Liveness: answers without touching any server (a pre-rendered body, no serializing).
    A new Response each time: middleware appends headers to a response's header list."""
    return Response(_HEALTH_BODY, media_type="application/json")


@router.get("/ready", response_model=Ready, responses=documented(503))
async def ready(services: ServicesDep) -> Any:
    """Readiness: the database answers with the expected schema (else 503); the broker
    answers and publishing works (else ``degraded``: jobs run locally or wait in SQL).
    A check that fails names its dependency only; why it failed goes to the log."""
    database = await _check_database(services)
    checks = {"database": database, "broker": await _check_broker(services)}
    if not database["ok"]:
        slug = "schema-missing" if database.get("schema") == "missing" else "database-unavailable"
        return problem(503, database["detail"], slug=slug, checks=checks, title="Not ready")
    ok = all(c["ok"] for c in checks.values())
    return {
        "status": "ok" if ok else "degraded",
        "checks": {k: {"ok": v["ok"], "detail": v.get("detail")} for k, v in checks.items()},
    }


async def _check_database(services: Services) -> dict[str, Any]:
    try:
        async with services.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception as e:  # any driver error means the database is not usable
        log.warning("ready: database unavailable: %s: %s", type(e).__name__, e)
        return {"ok": False, "detail": "database unavailable"}
    version = await _schema_version(services)
    if version != services.schema_head:
        log.warning("ready: schema at %s, expected %s", version, services.schema_head)
        return {
            "ok": False,
            "schema": "missing",
            "detail": "database schema is not migrated: run `tasklab db upgrade`",
        }
    return {"ok": True, "detail": None}


async def _schema_version(services: Services) -> str | None:
    try:
        async with services.engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).all()
    except Exception:  # no alembic_version table: never migrated
        return None
    return str(rows[0][0]) if len(rows) == 1 else None


async def _check_broker(services: Services) -> dict[str, Any]:
    if services.jobs.publisher.breaker.is_open:
        return {
            "ok": False,
            "detail": "publishing failed recently: jobs run locally "
            "(via=local) or wait in SQL until the broker is back",
        }
    if services.broker is None:
        return {"ok": True, "detail": "not checked for non-Redis brokers"}
    try:
        await services.broker.ping()
    except Exception as e:  # redis raises many types; all mean "not answering"
        log.warning("ready: broker ping failed: %s: %s", type(e).__name__, e)
        return {"ok": False, "detail": "broker unavailable"}
    return {"ok": True, "detail": None}
