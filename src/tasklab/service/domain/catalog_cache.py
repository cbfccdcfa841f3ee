"""The catalog cached in ``TieredCache`` (L1 per process + Redis), built to hold under orders.

* **Stock is kept apart.** Product details and listing pages are cached without it (name,
  category, price: they change only when the catalog does); stock is cached in a cache of its
  own (``STOCK_CACHE_NAME``, so each has its own hit rate) for ``STOCK_TTL_S``. A paid
  order deletes its products' stock keys after its transaction commits (never before, or a
  reader could cache the old stock again) and touches nothing else, so order traffic leaves
  the catalog in the cache. A listing's stock may lag a paid order by ``STOCK_TTL_S``;
  settlement checks the real stock anyway.
* **Bounded keys.** Only canonical listing pages are cached (page sizes in
  ``CANONICAL_PAGE_SIZES``, pages up to ``MAX_CACHED_PAGE``, never an empty page, so an unknown
  category costs a query but no key); an unknown product id is not cached either.
* **O(1) invalidation.** Listing keys carry a version token; ``invalidate_listings`` stores a
  new token (one key), and pages of the old one are never read again (they expire by TTL).
  ``tasklab seed`` clears the whole cache. Points balances are never cached.

Each process has one ``CatalogCache``: the API's lifespan registers its own; a Celery worker
builds a Redis-only one (nothing to keep in L1) on its first invalidation.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from tasklab.settings import Settings

if TYPE_CHECKING:
    from tasklab.cache import TieredCache

log = logging.getLogger("tasklab.service.cache")
CACHE_NAME = "products"
STOCK_CACHE_NAME = "product-stock"
TTL_S = 60.0
STOCK_TTL_S = 2.0
VERSION_KEY = "list-version"
VERSION_TTL_S = 24 * 3600.0  # outlives every page; if it expires, a new token is drawn
CANONICAL_PAGE_SIZES = frozenset({10, 20, 50, 100})
MAX_CACHED_PAGE = 50

_process_cache: CatalogCache | None = None


def detail_key(product_id: int) -> str:
    return f"product:{product_id}"


def stock_key(product_id: int) -> str:
    return f"stock:{product_id}"


def list_key(*, version: str, category: str | None, sort: str, page: int, page_size: int) -> str:
    return f"list:{version}:{sort}:{page}:{page_size}:{'' if category is None else category}"


def is_canonical(*, page: int, page_size: int) -> bool:
    return page_size in CANONICAL_PAGE_SIZES and page <= MAX_CACHED_PAGE


class Uncacheable(Exception):
    """Raised by a loader whose result must not be stored (an empty page); carries it."""

    def __init__(self, value: Any) -> None:
        super().__init__("not cached")
        self.value = value


def _new_version() -> str:
    return uuid.uuid4().hex[:12]


class CatalogCache:
    def __init__(self, cache: TieredCache, stock: TieredCache) -> None:
        self.cache = cache
        self.stock_cache = stock

    @classmethod
    def for_settings(cls, settings: Settings, *, l1: bool = True) -> CatalogCache | None:
        """None without Redis: an L1-only cache could not hear the workers' invalidations."""
        if not settings.redis_url:
            return None
        from tasklab.cache import Mode, TieredCache  # imported when used: workers rarely do

        mode: Mode = "tiered" if l1 else "l2"
        return cls(
            TieredCache(settings, name=CACHE_NAME, mode=mode, ttl_s=TTL_S),
            TieredCache(settings, name=STOCK_CACHE_NAME, mode=mode, ttl_s=STOCK_TTL_S),
        )

    async def product(
        self, product_id: int, loader: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """A product without its stock; ``loader`` raises for an unknown id (not cached)."""
        value: dict[str, Any] = await self.cache.aget_or_set(
            detail_key(product_id), loader, ttl_s=TTL_S
        )
        return value

    async def stock(self, product_id: int, loader: Callable[[], Awaitable[int]]) -> int:
        value: int = await self.stock_cache.aget_or_set(
            stock_key(product_id), loader, ttl_s=STOCK_TTL_S
        )
        return value

    async def listing_version(self) -> str:
        value: str = await self.cache.aget_or_set(
            VERSION_KEY, _async_value(_new_version), ttl_s=VERSION_TTL_S
        )
        return value

    async def page(
        self, key: str, loader: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """A listing page without stock; a loader raising ``Uncacheable`` is not stored."""
        try:
            value: dict[str, Any] = await self.cache.aget_or_set(key, loader, ttl_s=TTL_S)
        except Uncacheable as e:
            return dict(e.value)
        return value

    async def page_stock(
        self, key: str, loader: Callable[[], Awaitable[dict[str, int]]]
    ) -> dict[str, int]:
        """{product id (as a string): stock} for a listing page, kept ``STOCK_TTL_S``."""
        value: dict[str, int] = await self.stock_cache.aget_or_set(
            "stock:" + key, loader, ttl_s=STOCK_TTL_S
        )
        return value

    def invalidate(self, product_ids: Iterable[int]) -> None:
        """After a paid order: its products' stock, nothing else."""
        for product_id in product_ids:
            self.stock_cache.delete(stock_key(product_id))

    def invalidate_listings(self) -> None:
        """After a catalog change (names, prices, products added): every listing page, O(1)."""
        self.cache.set(VERSION_KEY, _new_version(), ttl_s=VERSION_TTL_S)

    def invalidate_products(self, product_ids: Iterable[int]) -> None:
        for product_id in product_ids:
            self.cache.delete(detail_key(product_id))
            self.stock_cache.delete(stock_key(product_id))
        self.invalidate_listings()

    def clear(self) -> None:
        self.cache.clear()
        self.stock_cache.clear()

    async def aclose(self) -> None:
        await self.cache.aclose()
        await self.stock_cache.aclose()

    def close(self) -> None:
        self.cache.close()
        self.stock_cache.close()


def _async_value(make: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def load() -> Any:
        return make()

    return load


def use_in_this_process(cache: CatalogCache | None) -> None:
    """The API registers its cache so that jobs run locally (fallback) invalidate it."""
    global _process_cache
    _process_cache = cache


def invalidate_after_commit(session: Session, product_ids: list[int]) -> None:
    """Invalidate the products once ``session`` commits (nothing if it rolls back)."""
    cache = _cache_for_this_process()
    if cache is None or not product_ids:
        return

    def after_commit(_session: Session) -> None:
        try:
            cache.invalidate(product_ids)
        except Exception:  # the TTL bounds staleness; never fail a committed settlement
            log.exception("catalog cache invalidation failed for %s", product_ids)

    event.listen(session, "after_commit", after_commit, once=True)


def invalidate_stock_now(product_ids: list[int]) -> None:
    """For a change already committed (a refund): drop the products' stock now."""
    cache = _cache_for_this_process()
    if cache is not None and product_ids:
        try:
            cache.invalidate(product_ids)
        except Exception:  # the TTL bounds staleness
            log.exception("catalog cache invalidation failed for %s", product_ids)


def _cache_for_this_process() -> CatalogCache | None:
    global _process_cache
    if _process_cache is None:
        settings = _worker_settings()
        if settings is not None:
            _process_cache = CatalogCache.for_settings(settings, l1=False)
    return _process_cache


def _worker_settings() -> Settings | None:
    """The settings of the tasklab Celery worker running this job, if that is where we are."""
    from celery import current_app

    app = current_app._get_current_object()
    settings = getattr(app, "tasklab_settings", None)
    return settings if isinstance(settings, Settings) else None
