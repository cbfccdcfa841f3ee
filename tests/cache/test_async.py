from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tasklab.cache import TieredCache
from tests.cache.conftest import CacheFactory
from tests.cache.support import wait_until


async def test_aset_aget_and_adelete_work_across_instances(make_cache: CacheFactory) -> None:
    a, b = make_cache(), make_cache()
    assert a.wait_coherent() and b.wait_coherent()
    await a.aset("k", {"v": 1})
    assert await a.aget("k") == {"v": 1} and a.counters.l1_hits == 1
    assert await b.aget("k") == {"v": 1} and b.counters.l2_hits == 1
    await a.adelete("k")
    assert await a.aget("k") is None
    assert wait_until(lambda: b.l1 is not None and "k" not in b.l1, timeout_s=1)
    assert await b.aget("k") is None
    await a.aclose()
    await b.aclose()


async def test_100_concurrent_async_misses_call_the_loader_once(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()
    calls: list[int] = []

    async def loader() -> str:
        calls.append(1)
        await asyncio.sleep(0.05)
        return "loaded"

    results = await asyncio.gather(*[cache.aget_or_set("hot", loader) for _ in range(100)])
    assert calls == [1] and set(results) == {"loaded"}
    await cache.aclose()


async def test_with_the_lock_two_caches_sharing_redis_load_once_between_them(
    make_cache: CacheFactory,
) -> None:
    # Two instances of one cache behave like two processes: separate L1s and flights.
    a, b = make_cache(lock=True), make_cache(lock=True)
    calls: list[str] = []

    def loader_for(who: str) -> Callable[[], Awaitable[str]]:
        async def loader() -> str:
            calls.append(who)
            await asyncio.sleep(0.1)
            return "loaded"

        return loader

    results = await asyncio.gather(
        *[c.aget_or_set("hot", loader_for("a" if c is a else "b")) for c in [a, b] * 50]
    )
    assert len(calls) == 1 and set(results) == {"loaded"}
    await a.aclose()
    await b.aclose()


async def test_adelete_tag_evicts_every_tagged_key(make_cache: CacheFactory) -> None:
    cache = make_cache()
    await cache.aset("a", 1, tags=["g"])
    await cache.aset("b", 2, tags=["g"])
    await cache.aset("c", 3)
    assert await cache.adelete_tag("g") == 2
    assert [await cache.aget(k) for k in "abc"] == [None, None, 3]
    await cache.aclose()


async def test_async_early_refresh_serves_the_old_value_to_others(
    make_cache: CacheFactory,
) -> None:
    now = [1_000_000.0]
    cache: TieredCache = make_cache(early_refresh=0.5, clock=lambda: now[0])
    assert await cache.aget_or_set("k", _const("v1"), ttl_s=10) == "v1"
    now[0] += 6
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "v2"

    refresher = asyncio.create_task(cache.aget_or_set("k", slow, ttl_s=10))
    await asyncio.sleep(0.01)
    assert await cache.aget_or_set("k", _const("never"), ttl_s=10) == "v1"
    release.set()
    assert await refresher == "v2"
    assert await cache.aget("k") == "v2", repr(cache.stats())
    await cache.aclose()


def _const(value: str) -> Callable[[], Awaitable[str]]:
    async def loader() -> str:
        return value

    return loader
