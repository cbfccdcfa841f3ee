"""The catalog: listing (paginated, filtered by category, sorted) and one product."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from tasklab.service.conditional import NOT_MODIFIED, conditional_json
from tasklab.service.deps import CurrentUser, PageNo, PageSize, ServicesDep
from tasklab.service.domain.catalog import ProductSort
from tasklab.service.problems import documented
from tasklab.service.schemas import MAX_ID, Page, Product

router = APIRouter(
    prefix="/api/v1/products", tags=["catalog"], responses=documented(401, 422, 429, 503)
)


@router.get("", response_model=Page[Product], responses=NOT_MODIFIED)
async def list_products(
    request: Request,
    services: ServicesDep,
    _user: CurrentUser,
    page: PageNo = 1,
    page_size: PageSize = 20,
    category: Annotated[
        str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _-]+$")
    ] = None,
    sort: Annotated[ProductSort, Query(description="price, -price, name, -name or id")] = "id",
) -> Any:
    """A page of the catalog, with an ETag (304 on a matching ``If-None-Match``)."""
    found = await services.catalog.page(
        page=page, page_size=page_size, category=category, sort=sort
    )
    return conditional_json(request, found)


@router.get("/{product_id}", response_model=Product, responses={**documented(404), **NOT_MODIFIED})
async def get_product(
    request: Request,
    services: ServicesDep,
    _user: CurrentUser,
    product_id: Annotated[int, Path(ge=1, le=MAX_ID)],
) -> Response:
    """One product, with an ETag (304 on a matching ``If-None-Match``)."""
    return conditional_json(request, await services.catalog.get(product_id))
