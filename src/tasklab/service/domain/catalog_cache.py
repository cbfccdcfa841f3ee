"""Product detail and listing pages cached in ``TieredCache`` (L1 per process + Redis).

Stock changes when a worker settles an order: the settlement registers an invalidation that
runs after its transaction commits (never before, or a reader could cache the old stock
again), deleting the products' detail keys and every listing page. ``tasklab seed`` clears the
whole cache. Points balances are never cached.

Each process has one ``CatalogCache``: the API's lifespan registers its own; a Celery worker
builds a Redis-only one (nothing to keep in L1) on its first invalidation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from tasklab.settings import Settings

if TYPE_CHECKING:
    from tasklab.cache import TieredCache

log = logging.getLogger("tasklab.service.cache")
CACHE_NAME = "products"
LISTS_TAG = "product-lists"
TTL_S = 60.0

_process_cache: CatalogCache | None = None


def detail_key(product_id: int) -> str:
    return f"product:{product_id}"


def list_key(*, category: str | None, sort: str, page: int, page_size: int) -> str:
    return f"list:{sort}:{page}:{page_size}:{'' if category is None else category}"


class CatalogCache:
    def __init__(self, cache: TieredCache) -> None:
        self.cache = cache

    @classmethod
    def for_settings(cls, settings: Settings, *, l1: bool = True) -> CatalogCache | None:
        """None without Redis: an L1-only cache could not hear the workers' invalidations."""
        if not settings.redis_url:
            return None
        from tasklab.cache import TieredCache  # imported when used: workers rarely need it

        return cls(
            TieredCache(settings, name=CACHE_NAME, mode="tiered" if l1 else "l2", ttl_s=TTL_S)
        )

    async def product(
        self, product_id: int, loader: Callable[[], Awaitable[dict[str, Any] | None]]
    ) -> dict[str, Any] | None:
        value: dict[str, Any] | None = await self.cache.aget_or_set(
            detail_key(product_id), loader, ttl_s=TTL_S
        )
        return value

    async def page(
        self, key: str, loader: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        value: dict[str, Any] = await self.cache.aget_or_set(
            key, loader, ttl_s=TTL_S, tags=[LISTS_TAG]
        )
        return value

    def invalidate(self, product_ids: Iterable[int]) -> None:
        for product_id in product_ids:
            self.cache.delete(detail_key(product_id))
        self.cache.delete_tag(LISTS_TAG)

    def clear(self) -> None:
        self.cache.clear()

    async def aclose(self) -> None:
        await self.cache.aclose()

    def close(self) -> None:
        self.cache.close()


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
