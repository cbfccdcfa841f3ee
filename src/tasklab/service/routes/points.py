"""The caller's points: balance, ledger history (newest first) and grants about to expire."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from tasklab.service.deps import CurrentUser, PageNo, PageSize, ServicesDep
from tasklab.service.problems import documented
from tasklab.service.schemas import ExpiringPoints, LedgerEntry, Page, PointsBalance

router = APIRouter(
    prefix="/api/v1/points", tags=["points"], responses=documented(401, 422, 429, 503)
)


@router.get("", response_model=PointsBalance)
async def get_balance(services: ServicesDep, user: CurrentUser) -> Any:
    return await services.points.balance(user.user_id)


@router.get("/history", response_model=Page[LedgerEntry])
async def get_history(
    services: ServicesDep, user: CurrentUser, page: PageNo = 1, page_size: PageSize = 20
) -> Any:
    result = await services.points.history(user.user_id, page=page, page_size=page_size)
    return result.to_dict()


@router.get("/expiring", response_model=ExpiringPoints)
async def get_expiring(
    services: ServicesDep, user: CurrentUser, days: Annotated[int, Query(ge=1, le=365)] = 7
) -> Any:
    return await services.points.expiring(user.user_id, days=days)
