"""Orders: placed here (202, settled by a worker job), read back by their owner only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Response

from tasklab.service.deps import CurrentUser, PageNo, PageSize, ServicesDep
from tasklab.service.domain.placement import Line
from tasklab.service.problems import documented
from tasklab.service.schemas import MAX_ID, Order, OrderAccepted, OrderIn, Page

router = APIRouter(
    prefix="/api/v1/orders", tags=["orders"], responses=documented(401, 422, 429, 503)
)
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Retrying with the same key returns the same order.",
    ),
]


@router.post(
    "", status_code=202, response_model=OrderAccepted, responses=documented(400, 409, 413, 415)
)
async def place_order(
    services: ServicesDep,
    user: CurrentUser,
    body: OrderIn,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Record the order as pending and submit the job that settles it."""
    lines = [Line(item.product_id, item.quantity) for item in body.items]
    placed = await services.orders.place(
        user.user_id, lines, use_points=body.use_points, idempotency_key=idempotency_key
    )
    if placed.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return placed.to_dict()


@router.get("", response_model=Page[Order])
async def list_orders(
    services: ServicesDep,
    user: CurrentUser,
    page: PageNo = 1,
    page_size: PageSize = 20,
    status: Annotated[
        Literal["pending", "paid", "rejected", "cancelled", "refunded"] | None, Query()
    ] = None,
) -> Any:
    result = await services.orders.page(user.user_id, page=page, page_size=page_size, status=status)
    return result.to_dict()


@router.get("/{order_id}", response_model=Order, responses=documented(404))
async def get_order(
    services: ServicesDep, user: CurrentUser, order_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> Any:
    return await services.orders.get(order_id, user_id=user.user_id, admin=user.is_admin)


@router.post("/{order_id}/cancel", response_model=Order, responses=documented(404, 409))
async def cancel_order(
    services: ServicesDep, user: CurrentUser, order_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> Any:
    """Cancel a pending order (``cancelled``, and its settlement job), or refund a paid one
    (``refunded``: its stock and points back). Asking again answers the same order; a
    rejected one is a 409."""
    return await services.orders.take_back(order_id, user_id=user.user_id, admin=user.is_admin)
