"""JSON views of the metrics for people and scripts; administrators only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tasklab.observe import system
from tasklab.service.auth import Principal
from tasklab.service.deps import CurrentUser, ServicesDep
from tasklab.service.domain.errors import Forbidden
from tasklab.service.problems import documented

router = APIRouter(
    prefix="/api/v1/metrics", tags=["metrics"], responses=documented(401, 403, 422, 429)
)


def _admin(user: Principal) -> None:
    if not user.is_admin:
        raise Forbidden("the metrics views need an administrator token")


# Plain `def`: psutil and the registry walk block, so they run in the threadpool.
@router.get("/system")
def system_view(services: ServicesDep, user: CurrentUser) -> dict[str, Any]:
    """CPU, memory, disk, network and uptime of the API's host."""
    _admin(user)
    return system.system_metrics(services.settings)


@router.get("/database")
def database_view(user: CurrentUser) -> dict[str, Any]:
    """Query count, average and max time, and recent slow queries (parameters redacted)."""
    _admin(user)
    return system.database_metrics()


@router.get("/application")
def application_view(request: Request, user: CurrentUser) -> dict[str, Any]:
    """Request and job rates and latencies."""
    _admin(user)
    return system.application_metrics(getattr(request.app.state, "metrics_registry", None))
