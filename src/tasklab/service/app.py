"""Build the FastAPI app. Nothing here runs at import: ``create_app(settings)`` does the work.

The lifespan builds the engine, the job manager and the services once per process; the schema
is not migrated here (``tasklab up``, ``tasklab seed`` and ``tasklab db upgrade`` do that), but
``/ready`` answers 503 with a problem naming the fix while it is missing.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from alembic.script import ScriptDirectory
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tasklab.database import make_async_engine
from tasklab.jobs import JobManager
from tasklab.migrations import alembic_config
from tasklab.service import console, problems
from tasklab.service.deps import Services
from tasklab.service.domain.catalog_cache import CatalogCache, use_in_this_process
from tasklab.service.limits import MAX_BODY_BYTES, BodyLimitMiddleware
from tasklab.service.rate_limits import RateLimiter, RateLimitMiddleware
from tasklab.service.routes import ROUTERS
from tasklab.settings import Settings, load_settings

log = logging.getLogger("tasklab.service")
TITLE = "tasklab reference service"
VERSION = "0.1.0"
DESCRIPTION = (
    "A shop with points whose orders are settled by worker jobs, and data-sync jobs. "
    "Authenticate with `Authorization: Bearer <token>` (see `tasklab seed`); errors "
    "are RFC 9457 `application/problem+json`."
)


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title=TITLE,
        version=VERSION,
        lifespan=_lifespan(settings),
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    problems.install(app)
    for router in ROUTERS:
        app.include_router(router)
    console.install(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=MAX_BODY_BYTES)
    app.add_middleware(RateLimitMiddleware)  # outermost of the two: counted before the body
    _install_metrics(app, settings)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app


def _lifespan(settings: Settings) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_async_engine(settings)
        jobs = JobManager(settings, async_engine=engine)
        broker = (
            aioredis.from_url(
                settings.effective_broker_url, socket_connect_timeout=0.5, socket_timeout=0.5
            )
            if settings.broker_is_redis
            else None
        )
        cache = CatalogCache.for_settings(settings)
        use_in_this_process(cache)  # jobs run locally (fallback) invalidate this cache
        limiter = RateLimiter.for_settings(settings)
        app.state.rate_limiter = limiter
        app.state.services = Services.build(
            settings,
            engine,
            jobs,
            broker=broker,
            cache=cache,
            limiter=limiter,
            schema_head=schema_head(settings),
        )
        # Everything built so far lives as long as the process: keep it out of the garbage
        # collector's full passes, whose pauses otherwise land on requests (tail latency).
        gc.freeze()
        try:
            yield
        finally:
            use_in_this_process(None)
            if limiter is not None:
                await limiter.aclose()
            if cache is not None:
                await cache.aclose()
            if broker is not None:
                await broker.aclose()
            await jobs.aclose()
            await engine.dispose()

    return lifespan


def schema_head(settings: Settings) -> str | None:
    """The revision the code expects the database to be at."""
    return ScriptDirectory.from_config(alembic_config(settings)).get_current_head()


def _install_metrics(app: FastAPI, settings: Settings) -> None:
    """HTTP metrics middleware, ``X-Process-Time`` and ``GET /metrics`` (tasklab.observe)."""
    from tasklab.observe import http

    http.install(app, settings)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The generated schema, plus the problem+json schemas the error responses refer to."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=DESCRIPTION
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                problems.problem_schemas()
            )
            app.openapi_schema = schema
        return app.openapi_schema

    return build


def create_app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker mode: each worker builds settings from the environment."""
    return create_app(load_settings())
