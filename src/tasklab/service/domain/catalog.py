"""The product catalog: one product, or a page of them (two queries whatever the page size)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklab.service.domain.catalog_cache import CatalogCache, list_key
from tasklab.service.domain.errors import NotFound
from tasklab.service.domain.models import Product, table
from tasklab.service.domain.paging import Page, money, offset_of

ProductSort = Literal["id", "price", "-price", "name", "-name"]
_COLUMNS = (Product.id, Product.name, Product.category, Product.price_cents, Product.stock)
_ORDER: dict[str, tuple[Any, ...]] = {
    "id": (Product.id.asc(),),
    "price": (Product.price_cents.asc(), Product.id.asc()),
    "-price": (Product.price_cents.desc(), Product.id.asc()),
    "name": (Product.name.asc(), Product.id.asc()),
    "-name": (Product.name.desc(), Product.id.asc()),
}


def product_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "category": row.category,
        "price": money(row.price_cents),
        "price_cents": row.price_cents,
        "stock": row.stock,
    }


class Catalog:
    """Reads through the catalog cache when there is one (see ``catalog_cache``)."""

    def __init__(self, engine: AsyncEngine, cache: CatalogCache | None = None) -> None:
        self.engine = engine
        self.cache = cache

    async def get(self, product_id: int) -> dict[str, Any]:
        if self.cache is None:
            found = await self._load(product_id)
        else:
            found = await self.cache.product(product_id, lambda: self._load(product_id))
        if found is None:
            raise NotFound("product", product_id)
        return found

    async def _load(self, product_id: int) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(*_COLUMNS).where(Product.id == product_id))).first()
        return None if row is None else product_dict(row)

    async def page(
        self, *, page: int, page_size: int, category: str | None = None, sort: ProductSort = "id"
    ) -> dict[str, Any]:
        """``{"items", "page", "page_size", "total"}``."""

        async def load() -> dict[str, Any]:
            found = await self._load_page(
                page=page, page_size=page_size, category=category, sort=sort
            )
            return found.to_dict()

        if self.cache is None:
            return await load()
        key = list_key(category=category, sort=sort, page=page, page_size=page_size)
        return await self.cache.page(key, load)

    async def _load_page(
        self, *, page: int, page_size: int, category: str | None, sort: ProductSort
    ) -> Page:
        conds = [] if category is None else [Product.category == category]
        rows_stmt = (
            sa.select(*_COLUMNS)
            .where(*conds)
            .order_by(*_ORDER[sort])
            .limit(page_size)
            .offset(offset_of(page, page_size))
        )
        total_stmt = sa.select(sa.func.count()).select_from(Product).where(*conds)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(rows_stmt)).all()
            total = (await conn.execute(total_stmt)).scalar_one()
        return Page([product_dict(r) for r in rows], page, page_size, int(total))


# Built once: constructing the statement per order cost more than running it.
_products = table(Product)
_PRICES = sa.select(_products.c.id, _products.c.price_cents).where(
    _products.c.id.in_(sa.bindparam("p_ids", expanding=True))
)


def prices_of(conn: Connection, product_ids: Iterable[int]) -> dict[int, int]:
    """{product_id: price_cents} for the ids that exist (one query)."""
    rows = conn.execute(_PRICES, {"p_ids": list(set(product_ids))})
    return {r.id: r.price_cents for r in rows}
