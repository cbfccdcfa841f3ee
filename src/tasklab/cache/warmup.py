"""Warm-up: fill L2 with values callers are about to ask for, from a periodic job.

The cache does not know what is hot; the application does. It supplies a *source*: a callable
returning ``(key, value)`` pairs (e.g. the N products with the most recent orders, as the
reference service's ``hottest products`` query). ``warm_from`` stores them through
``TieredCache.warm`` and reports what it did; ``beat_entry`` is the Celery beat schedule line
that runs the application's task every ``every_s`` seconds::

    @celery.task(name="shop.warm_hot_products")
    def warm_hot_products() -> dict[str, Any]:
        return warm_from(product_cache, lambda: hot_product_items(limit=200)).as_dict()

    celery.conf.beat_schedule["warm-hot-products"] = beat_entry("shop.warm_hot_products")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tasklab.cache.tiered import TieredCache

logger = logging.getLogger("tasklab.cache")

WarmSource = Callable[[], Iterable[tuple[str, Any]]]
DEFAULT_WARM_EVERY_S = 1800.0  # seed 001: every 30 minutes


@dataclass(frozen=True)
class WarmReport:
    cache: str
    keys: int  # values stored in Redis (0 if Redis was unreachable)
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def warm_from(
    cache: TieredCache, source: WarmSource, *, ttl_s: float | None = None, tags: Sequence[str] = ()
) -> WarmReport:
    """Store every pair ``source()`` yields in ``cache`` (batched); never raises for Redis.
    A key stored or deleted after ``source()`` began keeps that newer state."""
    start = time.perf_counter()
    read_at = cache.clock()  # before the source reads: anything stored since is newer
    stored = cache.warm(source(), ttl_s=ttl_s, tags=tags, read_at=read_at)
    report = WarmReport(cache.name, stored, time.perf_counter() - start)
    logger.info("cache %r: warmed %d keys in %.3fs", cache.name, stored, report.duration_s)
    return report


def beat_entry(
    task_name: str, *, every_s: float = DEFAULT_WARM_EVERY_S, kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A Celery ``beat_schedule`` value running ``task_name`` every ``every_s`` seconds."""
    return {"task": task_name, "schedule": every_s, "kwargs": dict(kwargs or {})}


__all__ = ["DEFAULT_WARM_EVERY_S", "WarmReport", "WarmSource", "beat_entry", "warm_from"]
