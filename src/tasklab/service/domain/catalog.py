"""The product catalog: one product, or a page of them (two queries whatever the page size)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklab.service.domain.catalog_cache import (
    CatalogCache,
    Uncacheable,
    is_canonical,
    list_key,
)
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
    return {**static_dict(row), "stock": row.stock}


def static_dict(row: Any) -> dict[str, Any]:
    """What changes only with the catalog (cached long); stock is apart (see catalog_cache)."""
    return {
        "id": row.id,
        "name": row.name,
        "category": row.category,
        "price": money(row.price_cents),
        "price_cents": row.price_cents,
    }


class Catalog:
    """Reads through the catalog cache when there is one (see ``catalog_cache``)."""

    def __init__(self, engine: AsyncEngine, cache: CatalogCache | None = None) -> None:
        self.engine = engine
        self.cache = cache

    async def get(self, product_id: int) -> dict[str, Any]:
        if self.cache is None:
            row = await self._row(product_id)
            if row is None:
                raise NotFound("product", product_id)
            return product_dict(row)

        async def load_static() -> dict[str, Any]:
            row = await self._row(product_id)
            if row is None:
                raise NotFound("product", product_id)  # not cached: ids are the caller's
            return static_dict(row)

        static = await self.cache.product(product_id, load_static)
        stock = await self.cache.stock(product_id, lambda: self._stock(product_id))
        return {**static, "stock": stock}

    async def _row(self, product_id: int) -> Any:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(sa.select(*_COLUMNS).where(Product.id == product_id))
            ).first()

    async def _stock(self, product_id: int) -> int:
        async with self.engine.connect() as conn:
            found = await conn.execute(sa.select(Product.stock).where(Product.id == product_id))
            return int(found.scalar_one_or_none() or 0)

    async def page(
        self, *, page: int, page_size: int, category: str | None = None, sort: ProductSort = "id"
    ) -> dict[str, Any]:
        """``{"items", "page", "page_size", "total"}``; canonical pages through the cache."""

        async def load() -> dict[str, Any]:
            found = await self._load_page(
                page=page, page_size=page_size, category=category, sort=sort
            )
            return found.to_dict()

        if self.cache is None or not is_canonical(page=page, page_size=page_size):
            return await load()

        async def load_static() -> dict[str, Any]:
            found = await load()
            static = {**found, "items": [_without_stock(i) for i in found["items"]]}
            if not found["items"]:
                raise Uncacheable(static)  # an unknown category or a page past the end
            return static

        version = await self.cache.listing_version()
        key = list_key(
            version=version, category=category, sort=sort, page=page, page_size=page_size
        )
        cached = await self.cache.page(key, load_static)
        ids = [item["id"] for item in cached["items"]]
        stock = await self.cache.page_stock(key, lambda: self._stocks(ids)) if ids else {}
        items = [{**item, "stock": stock.get(str(item["id"]), 0)} for item in cached["items"]]
        return {**cached, "items": items}

    async def _stocks(self, product_ids: list[int]) -> dict[str, int]:
        stmt = sa.select(Product.id, Product.stock).where(Product.id.in_(product_ids))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return {str(r.id): int(r.stock) for r in rows}

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


def _without_stock(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "stock"}


# Built once: constructing the statement per order cost more than running it.
_products = table(Product)
_PRICES = sa.select(_products.c.id, _products.c.price_cents).where(
    _products.c.id.in_(sa.bindparam("p_ids", expanding=True))
)


def prices_of(conn: Connection, product_ids: Iterable[int]) -> dict[int, int]:
    """{product_id: price_cents} for the ids that exist (one query)."""
    rows = conn.execute(_PRICES, {"p_ids": list(set(product_ids))})
    return {r.id: r.price_cents for r in rows}
