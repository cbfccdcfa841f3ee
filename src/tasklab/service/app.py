"""Build the FastAPI app. Nothing here runs at import: ``create_app(settings)`` does the work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import ORJSONResponse
from sqlalchemy import text

from tasklab.database import make_async_engine
from tasklab.settings import Settings, load_settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = make_async_engine(settings)
        yield
        await app.state.engine.dispose()

    app = FastAPI(title="tasklab reference service", version="0.1.0", lifespan=lifespan,
                  default_response_class=ORJSONResponse)
    app.state.settings = settings

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: answers without touching any server."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready() -> ORJSONResponse:
        """Readiness: the database and the broker answer."""
        checks = {"database": await _check_db(app), "broker": await _check_broker(settings)}
        status = "ok" if all(c["ok"] for c in checks.values()) else "degraded"
        code = 503 if not checks["database"]["ok"] else 200
        return ORJSONResponse({"status": status, "checks": checks}, status_code=code)

    return app


async def _check_db(app: FastAPI) -> dict[str, Any]:
    try:
        async with app.state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return {"ok": True}
    except Exception as e:  # any driver error means not ready
        return {"ok": False, "error": type(e).__name__}


async def _check_broker(settings: Settings) -> dict[str, Any]:
    if not settings.broker_is_redis:
        return {"ok": True, "detail": "not checked for non-Redis brokers"}
    client = aioredis.from_url(settings.effective_broker_url, socket_connect_timeout=0.5,
                               socket_timeout=0.5)
    try:
        await client.ping()
        return {"ok": True}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__}
    finally:
        await client.aclose()


def create_app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker mode: each worker builds settings from the environment."""
    return create_app(load_settings())
