"""What routes depend on: the services built in the lifespan, the current user, paging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklab.database import SqlRunner
from tasklab.jobs import JobManager
from tasklab.service.auth import Authenticator, Principal
from tasklab.service.domain.catalog import Catalog
from tasklab.service.domain.catalog_cache import CatalogCache
from tasklab.service.domain.data_sync import DataSync
from tasklab.service.domain.errors import Forbidden
from tasklab.service.domain.job_views import JobViews
from tasklab.service.domain.orders import Orders
from tasklab.service.domain.paging import MAX_PAGE, MAX_PAGE_SIZE
from tasklab.service.domain.points import Points
from tasklab.service.rate_limits import RateLimiter, address_of
from tasklab.settings import Settings


@dataclass
class Services:
    """Everything a request may use; one per app, built by the lifespan."""

    settings: Settings
    engine: AsyncEngine
    jobs: JobManager
    auth: Authenticator
    catalog: Catalog
    points: Points
    orders: Orders
    data_sync: DataSync
    job_views: JobViews
    broker: Any  # redis.asyncio client for /ready, or None for non-Redis brokers
    schema_head: str | None
    limiter: RateLimiter | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        engine: AsyncEngine,
        jobs: JobManager,
        *,
        broker: Any,
        cache: CatalogCache | None,
        schema_head: str | None,
        limiter: RateLimiter | None = None,
    ) -> Services:
        reader = read_engine(engine)
        sql = SqlRunner(
            engine, sync_engine=jobs.engine, reader=reader, max_concurrent=settings.db_pool_size
        )
        return cls(
            settings=settings,
            engine=engine,
            jobs=jobs,
            auth=Authenticator(sql, failure_ttl_s=settings.auth_failure_cache_s, limiter=limiter),
            catalog=Catalog(reader, cache),
            points=Points(sql),
            orders=Orders(sql, jobs, in_flight_max=settings.orders_in_flight_max),
            data_sync=DataSync(reader, jobs, in_flight_max=settings.data_sync_jobs_in_flight_max),
            job_views=JobViews(jobs),
            broker=broker,
            schema_head=schema_head,
            limiter=limiter,
        )


def read_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, for reads that need no transaction. On PostgreSQL, autocommit saves
    the BEGIN and the ROLLBACK around every single-SELECT request (two of its four round
    trips); SQLite's driver opens no transaction for reads anyway."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    """Async on purpose: FastAPI runs a plain-def dependency in a thread, per request."""
    return services_of(request)


_bearer = HTTPBearer(auto_error=False, description="The token `tasklab seed` wrote for you.")


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    token = credentials.credentials if credentials is not None else None
    return await services_of(request).auth.authenticate(token, address=address_of(request.scope))


ServicesDep = Annotated[Services, Depends(get_services)]
CurrentUser = Annotated[Principal, Depends(current_user)]


async def current_admin(user: CurrentUser) -> Principal:
    if not user.is_admin:
        raise Forbidden("this needs an administrator token")
    return user


AdminUser = Annotated[Principal, Depends(current_admin)]
PageNo = Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number.")]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
