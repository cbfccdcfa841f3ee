"""Fenced loads for ``TieredCache`` (``get_or_set`` on a miss), sync and asyncio.

A load is fenced: L2 is read (``Seen``) before the loader starts, and its result is stored only
if L2 still holds exactly that (compare-and-set), and kept in L1 only if no write or
invalidation of the key overlapped it here (write token). A delete during the load leaves a
tombstone, so the slower, older read never overwrites the newer state. With ``lock`` one
process loads while the others poll L2; early refresh reloads while callers get the current
value.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar, cast

from tasklab.cache.backends.memory import CacheEntry
from tasklab.cache.backends.redis import StoredItem
from tasklab.cache.errors import L2Unavailable
from tasklab.cache.invalidation import encode_notice
from tasklab.cache.plans import UNSEEN, Plan, Seen, ms

if TYPE_CHECKING:
    from tasklab.cache.tiered import TieredCache

logger = logging.getLogger("tasklab.cache")
T = TypeVar("T")
LOCK_POLL_MIN_S = 0.002  # waiting for another process's loader: first poll of L2
LOCK_POLL_MAX_S = 0.02


def refresh_due(cache: TieredCache, entry: CacheEntry, override: float | None) -> bool:
    ratio = cache.early_refresh if override is None else override
    return ratio is not None and entry.refresh_due(ratio, cache.clock())


def load(cache: TieredCache, key: str, loader: Callable[[], T], plan: Plan) -> T:
    entry = recheck_l1(cache, key)
    if entry is not None:
        return cast(T, entry.value)
    if plan.lock and cache.l2 is not None and cache.l2.available:
        return load_locked(cache, key, loader, plan)
    seen = observe(cache, key)
    if seen.entry is not None:
        return cast(T, seen.entry.value)
    return load_and_store(cache, key, loader, plan, seen)


def recheck_l1(cache: TieredCache, key: str) -> CacheEntry | None:
    """Inside the flight: did the flight that just ended store it? (Not counted.)"""
    if cache.l1 is not None and cache._l1_readable():
        return cache.l1.get(key)
    return None


def observe(cache: TieredCache, key: str) -> Seen:
    if cache.l2 is None:
        return UNSEEN
    try:
        return cache._fetch_l2(key)
    except L2Unavailable:
        return UNSEEN


def load_and_store(
    cache: TieredCache, key: str, loader: Callable[[], T], plan: Plan, seen: Seen
) -> T:
    token = cache._begin_write(key)
    entry: CacheEntry | None = None
    stored: bool | None = False
    try:
        start = time.perf_counter()
        try:
            value = loader()
        finally:
            cache.counters.load(time.perf_counter() - start)
        if value is not None or cache._ttl_for(None, plan) > 0:  # else: negative caching off
            item, entry = cache._prepare(key, value, plan)
            stored = l2_store(cache, item, seen)
        return value
    finally:
        cache._finish_write(key, token, entry, stored)


def l2_store(cache: TieredCache, item: StoredItem, seen: Seen) -> bool | None:
    """Compare-and-set after a load: True stored, False fenced off, None unreachable."""
    if cache.l2 is None:
        return True
    try:
        return cache.l2.store(
            item, condition=seen.raw or b"", notice=encode_notice(cache._sender, [item.key])
        )
    except L2Unavailable:
        return None


async def al2_store(cache: TieredCache, item: StoredItem, seen: Seen) -> bool | None:
    if cache.l2 is None:
        return True
    try:
        return await cache.l2.astore(
            item, condition=seen.raw or b"", notice=encode_notice(cache._sender, [item.key])
        )
    except L2Unavailable:
        return None


def load_locked(cache: TieredCache, key: str, loader: Callable[[], T], plan: Plan) -> T:
    """Load under the Redis lock, or wait for the process holding it to store the value."""
    assert cache.l2 is not None
    deadline = time.monotonic() + cache.lock_ttl_s
    delay_s = LOCK_POLL_MIN_S
    while True:
        try:
            token = cache.l2.try_lock(key, ms(cache.lock_ttl_s))
        except L2Unavailable:
            return load_and_store(cache, key, loader, plan, UNSEEN)
        seen = observe(cache, key)  # holder: what must still be there when we store
        if seen.entry is not None or token is not None:
            return load_holding(cache, key, token, loader, plan, seen)
        if time.monotonic() >= deadline:  # the holder is stuck or gone: stop waiting
            return load_and_store(cache, key, loader, plan, seen)
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, LOCK_POLL_MAX_S)


def load_holding(
    cache: TieredCache,
    key: str,
    token: str | None,
    loader: Callable[[], T],
    plan: Plan,
    seen: Seen,
) -> T:
    assert cache.l2 is not None
    try:
        if seen.entry is not None:
            return cast(T, seen.entry.value)
        return load_and_store(cache, key, loader, plan, seen)
    finally:
        if token is not None:
            cache.l2.unlock(key, token)


def refresh(
    cache: TieredCache, key: str, entry: CacheEntry, loader: Callable[[], T], plan: Plan
) -> T:
    """Early refresh: one caller reloads; everyone else gets the current value meanwhile."""
    ran, value = cache._flights.do_if_idle(
        key, lambda: refresh_now(cache, key, entry, loader, plan)
    )
    return cast(T, value if ran else entry.value)


def refresh_now(
    cache: TieredCache, key: str, entry: CacheEntry, loader: Callable[[], T], plan: Plan
) -> T:
    token = None
    if plan.lock and cache.l2 is not None:
        try:
            token = cache.l2.try_lock(key, ms(cache.lock_ttl_s))
        except L2Unavailable:
            token = None
        if token is None:  # another process is refreshing it
            return cast(T, entry.value)
    try:
        return load_and_store(cache, key, loader, plan, observe(cache, key))
    except Exception:
        logger.warning(
            "cache %r: early refresh of %r failed; serving the current value",
            cache.name,
            key,
            exc_info=True,
        )
        return cast(T, entry.value)
    finally:
        if token is not None and cache.l2 is not None:
            cache.l2.unlock(key, token)


# --- loading, asyncio -------------------------------------------------------------------------
async def aload(cache: TieredCache, key: str, loader: Callable[[], Awaitable[T]], plan: Plan) -> T:
    entry = recheck_l1(cache, key)
    if entry is not None:
        return cast(T, entry.value)
    if plan.lock and cache.l2 is not None and cache.l2.available:
        return await aload_locked(cache, key, loader, plan)
    seen = await aobserve(cache, key)
    if seen.entry is not None:
        return cast(T, seen.entry.value)
    return await aload_and_store(cache, key, loader, plan, seen)


async def aobserve(cache: TieredCache, key: str) -> Seen:
    if cache.l2 is None:
        return UNSEEN
    try:
        return await cache._afetch_l2(key)
    except L2Unavailable:
        return UNSEEN


async def aload_and_store(
    cache: TieredCache, key: str, loader: Callable[[], Awaitable[T]], plan: Plan, seen: Seen
) -> T:
    token = cache._begin_write(key)
    entry: CacheEntry | None = None
    stored: bool | None = False
    try:
        start = time.perf_counter()
        try:
            value = await loader()
        finally:
            cache.counters.load(time.perf_counter() - start)
        if value is not None or cache._ttl_for(None, plan) > 0:
            item, entry = cache._prepare(key, value, plan)
            stored = await al2_store(cache, item, seen)
        return value
    finally:
        cache._finish_write(key, token, entry, stored)


async def aload_locked(
    cache: TieredCache, key: str, loader: Callable[[], Awaitable[T]], plan: Plan
) -> T:
    assert cache.l2 is not None
    deadline = time.monotonic() + cache.lock_ttl_s
    delay_s = LOCK_POLL_MIN_S
    while True:
        try:
            token = await cache.l2.atry_lock(key, ms(cache.lock_ttl_s))
        except L2Unavailable:
            return await aload_and_store(cache, key, loader, plan, UNSEEN)
        seen = await aobserve(cache, key)
        if seen.entry is not None or token is not None:
            return await aload_holding(cache, key, token, loader, plan, seen)
        if time.monotonic() >= deadline:
            return await aload_and_store(cache, key, loader, plan, seen)
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, LOCK_POLL_MAX_S)


async def aload_holding(
    cache: TieredCache,
    key: str,
    token: str | None,
    loader: Callable[[], Awaitable[T]],
    plan: Plan,
    seen: Seen,
) -> T:
    assert cache.l2 is not None
    try:
        if seen.entry is not None:
            return cast(T, seen.entry.value)
        return await aload_and_store(cache, key, loader, plan, seen)
    finally:
        if token is not None:
            await cache.l2.aunlock(key, token)


async def arefresh(
    cache: TieredCache,
    key: str,
    entry: CacheEntry,
    loader: Callable[[], Awaitable[T]],
    plan: Plan,
) -> T:
    ran, value = await cache._aflights.do_if_idle(
        key, lambda: arefresh_now(cache, key, entry, loader, plan)
    )
    return cast(T, value if ran else entry.value)


async def arefresh_now(
    cache: TieredCache,
    key: str,
    entry: CacheEntry,
    loader: Callable[[], Awaitable[T]],
    plan: Plan,
) -> T:
    token = None
    if plan.lock and cache.l2 is not None:
        try:
            token = await cache.l2.atry_lock(key, ms(cache.lock_ttl_s))
        except L2Unavailable:
            token = None
        if token is None:
            return cast(T, entry.value)
    try:
        return await aload_and_store(cache, key, loader, plan, await aobserve(cache, key))
    except Exception:
        logger.warning(
            "cache %r: early refresh of %r failed; serving the current value",
            cache.name,
            key,
            exc_info=True,
        )
        return cast(T, entry.value)
    finally:
        if token is not None and cache.l2 is not None:
            await cache.l2.aunlock(key, token)
