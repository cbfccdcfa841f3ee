"""Redis down: the cache keeps serving, never raises, costs little, and recovers cleanly."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasklab.cache import TieredCache
from tasklab.embedded import EmbeddedRedis
from tasklab.settings import Settings
from tests.cache.conftest import CacheFactory, metric
from tests.cache.support import TcpProxy, wait_until


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    """The test's Redis behind a proxy the test can cut (Redis keeps running and its data)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    p = TcpProxy(port)
    yield p
    p.close()


def settings_for(url: str, tmp_path: Path) -> Settings:
    return Settings(home_dir=tmp_path / ".tasklab", redis_url=url)


def test_with_redis_down_the_cache_serves_from_l1_and_the_loader_and_never_raises(
    own_redis: EmbeddedRedis,
    make_cache: CacheFactory,
    tmp_path: Path,
) -> None:
    cache = make_cache(settings=settings_for(own_redis.url, tmp_path), breaker_reset_s=60)
    assert cache.wait_coherent()
    cache.set("before", 1)
    own_redis.stop()
    assert wait_until(lambda: not cache.coherent)
    calls: list[int] = []

    def loader() -> str:
        calls.append(1)
        return "from the database"

    for _ in range(50):
        assert cache.get_or_set("k", loader) == "from the database"
    assert calls == [1]  # the first call loaded, L1 served the rest
    assert cache.get("unknown") is None
    cache.set("during", 2)
    assert cache.get("during") == 2
    cache.delete("during")
    assert cache.delete_tag("t") == 0
    assert cache.warm([("w", 1)]) == 0
    cache.clear()
    assert cache.stats()["l2"]["available"] is False


async def test_async_calls_never_raise_with_redis_down(
    own_redis: EmbeddedRedis,
    make_cache: CacheFactory,
    tmp_path: Path,
) -> None:
    cache = make_cache(settings=settings_for(own_redis.url, tmp_path), breaker_reset_s=60)
    assert cache.wait_coherent()
    await cache.aset("k", 1)
    own_redis.stop()
    assert wait_until(lambda: not cache.coherent)

    async def loader() -> int:
        return 7

    assert await cache.aget_or_set("x", loader) == 7
    assert await cache.aget("x") == 7
    await cache.aset("y", 2)
    await cache.adelete("y")
    assert await cache.adelete_tag("t") == 0
    await cache.aclose()


def test_the_open_circuit_keeps_a_dead_redis_under_1ms_per_call(
    own_redis: EmbeddedRedis,
    make_cache: CacheFactory,
    tmp_path: Path,
) -> None:
    cache = make_cache(
        settings=settings_for(own_redis.url, tmp_path), breaker_threshold=3, breaker_reset_s=60
    )
    cache.set("warm", 1)
    own_redis.stop()
    calls = 2000
    start = time.perf_counter()
    for i in range(calls):
        cache.get_or_set(f"k{i}", lambda: None)
    per_call_s = (time.perf_counter() - start) / calls
    assert per_call_s < 0.001, f"{per_call_s * 1e6:.0f} µs per call"
    # The proof it is the breaker: only the calls before it opened touched the network.
    assert cache.stats()["l2"]["errors"] <= 3


def test_the_outage_and_the_recovery_are_each_logged_once_and_exported(
    own_redis: EmbeddedRedis,
    make_cache: CacheFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = make_cache(
        settings=settings_for(own_redis.url, tmp_path), breaker_threshold=1, breaker_reset_s=0.2
    )
    available = "tasklab_cache_redis_available"
    caplog.set_level(logging.WARNING, logger="tasklab.cache")
    cache.set("k", 1)
    port = own_redis.port
    own_redis.stop()
    for i in range(200):
        cache.get(f"k{i}")
    assert metric(available, cache=cache.name) == 0
    restarted = EmbeddedRedis(own_redis.data_dir, port=port)
    restarted.start()
    try:
        assert wait_until(
            lambda: cache.get("k") is None and metric(available, cache=cache.name) == 1
        )
    finally:
        restarted.stop()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("is unreachable" in m for m in messages) == 1
    assert sum("answers again" in m for m in messages) == 1


def test_after_an_outage_l1_entries_written_meanwhile_are_dropped(
    proxy: TcpProxy,
    make_cache: CacheFactory,
    tmp_path: Path,
) -> None:
    a = make_cache(
        settings=settings_for(proxy.url, tmp_path), breaker_threshold=1, breaker_reset_s=0.1
    )
    b = make_cache()  # directly on Redis: never sees the outage
    assert a.wait_coherent() and b.wait_coherent()
    assert a.l1 is not None
    proxy.cut()
    assert wait_until(lambda: not a.coherent)  # the loss clears L1; what follows stays
    assert a.get_or_set("k", lambda: "loaded during the outage") == "loaded during the outage"
    entry = a.l1.peek("k")
    assert entry is not None and entry.suspect
    b.set("k", "fresh")  # a cannot hear this notice
    assert a.get("k") == "loaded during the outage"  # degraded mode: L1 is all a has
    proxy.restore()
    assert wait_until(lambda: a.get("k") == "fresh", timeout_s=5)
    assert a.coherent


def test_a_delete_that_could_not_reach_redis_is_replayed_when_it_is_back(
    proxy: TcpProxy,
    make_cache: CacheFactory,
    tmp_path: Path,
) -> None:
    a = make_cache(
        settings=settings_for(proxy.url, tmp_path), breaker_threshold=1, breaker_reset_s=0.1
    )
    b = make_cache()
    a.set("price", 10)
    a.set("listing", [10], tags=["product:1"])
    assert b.get("price") == 10 and b.get("listing") == [10]
    proxy.cut()
    a.delete("price")  # the price changed while a could not reach Redis
    a.delete_tag("product:1")
    assert b.get("price") == 10  # Redis still holds the old value...
    proxy.restore()
    # ...until a is back and replays its deletes; b's L1 copies go too.
    assert wait_until(lambda: b.get("price") is None and b.get("listing") is None, timeout_s=5)
    assert a.stats()["pending_replays"] == 0


def test_a_cache_created_while_redis_is_down_starts_and_serves(tmp_path: Path) -> None:
    dead = EmbeddedRedis(tmp_path / "dead")
    dead.start()
    url = dead.url
    dead.stop()
    cache = TieredCache(settings_for(url, tmp_path), name="born-in-outage", breaker_threshold=1)
    try:
        assert cache.get_or_set("k", lambda: "v") == "v"
        assert cache.get_or_set("k", lambda: "other") == "v"
    finally:
        cache.close()
