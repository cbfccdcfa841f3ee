from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from tasklab.cache import CacheConfigError, CacheSerializationError, TieredCache
from tasklab.cache.constants import value_key
from tasklab.settings import Settings
from tests.cache.conftest import CacheFactory, metric
from tests.cache.support import wait_until


class ManualClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def pttl_ms(redis_url: str, cache: str, key: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.pttl(value_key(cache, key)))
    finally:
        client.close()


def test_a_set_value_is_read_from_l1_here_and_from_redis_by_another_instance(
    make_cache: CacheFactory,
) -> None:
    a, b = make_cache(), make_cache()
    assert a.wait_coherent() and b.wait_coherent()
    a.set("k", {"name": "tea", "tags": ("green", "loose")})
    assert wait_until(lambda: b.counters.invalidations == 1)  # a's notice has reached b
    assert a.get("k") == {"name": "tea", "tags": ["green", "loose"]}
    assert a.counters.l1_hits == 1
    assert b.get("k") == {"name": "tea", "tags": ["green", "loose"]}
    assert (b.counters.l1_misses, b.counters.l2_hits) == (1, 1)
    assert b.l1 is not None and "k" in b.l1  # filled on the way back
    assert b.get("k") is not None and b.counters.l1_hits == 1


def test_an_unknown_key_is_none_and_counts_a_miss_on_both_levels(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()
    assert cache.wait_coherent()
    assert cache.get("nope") is None
    stats = cache.stats()
    assert (stats["l1_misses"], stats["l2_misses"], stats["hit_rate"]) == (1, 1, 0.0)


def test_values_live_in_redis_for_ttl_s_and_not_found_for_its_own_shorter_ttl(
    make_cache: CacheFactory,
    redis_url: str,
    cache_name: str,
) -> None:
    cache = make_cache(negative_ttl_s=2)
    cache.set("found", 1, ttl_s=30)
    assert cache.get_or_set("missing", lambda: None) is None
    assert 29_000 < pttl_ms(redis_url, cache_name, "found") <= 30_000
    assert 0 < pttl_ms(redis_url, cache_name, "missing") <= 2_000
    cache.get_or_set("other", lambda: None, negative_ttl_s=0.5)
    assert 0 < pttl_ms(redis_url, cache_name, "other") <= 500


def test_a_cached_not_found_is_served_without_calling_the_loader_until_it_expires(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache(negative_ttl_s=0.2)
    assert cache.wait_coherent()
    calls: list[int] = []

    def loader() -> str | None:
        calls.append(1)
        return None if len(calls) == 1 else "now exists"

    assert cache.get_or_set("k", loader) is None
    assert cache.get_or_set("k", loader) is None
    assert calls == [1] and cache.counters.negative_hits == 1
    assert wait_until(lambda: cache.get_or_set("k", loader) == "now exists", timeout_s=3)
    assert len(calls) == 2


def test_negative_caching_can_be_turned_off(make_cache: CacheFactory) -> None:
    cache = make_cache(negative_ttl_s=0)
    calls: list[int] = []
    for _ in range(3):
        cache.get_or_set("k", lambda: calls.append(1))
    assert len(calls) == 3


def test_delete_removes_the_key_from_both_levels(make_cache: CacheFactory) -> None:
    a, b = make_cache(), make_cache()
    assert a.wait_coherent() and b.wait_coherent()
    a.set("k", 1)
    assert b.get("k") == 1
    a.delete("k")
    assert a.get("k") is None
    assert wait_until(lambda: b.l1 is not None and "k" not in b.l1, timeout_s=1)
    assert b.get("k") is None


def test_delete_tag_removes_every_key_with_the_tag_and_no_other(
    make_cache: CacheFactory,
) -> None:
    a, b = make_cache(), make_cache()
    assert a.wait_coherent() and b.wait_coherent()
    a.set("p1", 1, tags=["product:1"])
    a.set("list", [1, 2], tags=["product:1", "listing"])
    a.set("p2", 2, tags=["product:2"])
    assert [b.get(k) for k in ("p1", "list", "p2")] == [1, [1, 2], 2]
    assert a.delete_tag("product:1") == 2
    assert a.get("p1") is None and a.get("list") is None and a.get("p2") == 2
    assert wait_until(lambda: b.l1 is not None and "p1" not in b.l1 and "list" not in b.l1)
    assert b.get("p1") is None and b.get("p2") == 2


def test_a_short_l1_ttl_sends_reads_back_to_redis_in_every_process(
    make_cache: CacheFactory,
) -> None:
    a, b = make_cache(), make_cache()
    assert a.wait_coherent() and b.wait_coherent()
    a.set("k", "v", ttl_s=60, l1_ttl_s=0.3)
    assert wait_until(lambda: b.counters.invalidations == 1)  # a's notice has reached b
    assert b.get("k") == "v"
    assert b.l1 is not None
    filled = b.l1.peek("k")
    assert filled is not None and filled.expires_at - time.monotonic() <= 0.3
    assert wait_until(lambda: a.l1 is not None and "k" not in a.l1, timeout_s=2)
    assert a.get("k") == "v" and a.counters.l2_hits == 1


def test_100_concurrent_misses_call_the_loader_once_in_a_process(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()
    assert cache.wait_coherent()
    calls: list[int] = []
    results: list[str] = []
    start = threading.Barrier(100)

    def loader() -> str:
        calls.append(1)
        time.sleep(0.05)
        return "loaded"

    def run() -> None:
        start.wait()
        results.append(cache.get_or_set("hot", loader))

    threads = [threading.Thread(target=run) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == ["loaded"] * 100
    assert cache.counters.loads == 1


def test_a_loader_error_reaches_the_caller_and_is_not_cached(make_cache: CacheFactory) -> None:
    cache = make_cache()

    def broken() -> str:
        raise LookupError("database said no")

    with pytest.raises(LookupError):
        cache.get_or_set("k", broken)
    assert cache.get_or_set("k", lambda: "ok") == "ok"


def test_early_refresh_serves_the_current_value_while_one_caller_reloads(
    make_cache: CacheFactory,
) -> None:
    clock = ManualClock()
    cache = make_cache(early_refresh=0.5, clock=clock)
    assert cache.wait_coherent()

    def must_not_load() -> str:
        raise AssertionError("loader called")

    assert cache.get_or_set("k", lambda: "v1", ttl_s=100) == "v1"
    clock.now += 49
    assert cache.get_or_set("k", must_not_load, ttl_s=100) == "v1"
    clock.now += 2  # past half the TTL: the next caller refreshes
    entered, release = threading.Event(), threading.Event()
    refreshed: list[str] = []

    def slow_loader() -> str:
        entered.set()
        release.wait(5)
        return "v2"

    refresher = threading.Thread(
        target=lambda: refreshed.append(cache.get_or_set("k", slow_loader, ttl_s=100))
    )
    refresher.start()
    assert entered.wait(5)
    assert cache.get_or_set("k", must_not_load, ttl_s=100) == "v1"  # not blocked, not stale-less
    release.set()
    refresher.join()
    assert refreshed == ["v2"] and cache.get("k") == "v2"


def test_l1_only_mode_needs_no_redis(tmp_path: Path) -> None:
    cache = TieredCache(Settings(home_dir=tmp_path), name="local")
    assert cache.mode == "l1" and cache.l2 is None and cache.coherent
    cache.set("a", 1, tags=["t"])
    assert cache.get_or_set("b", lambda: 2, tags=["t"]) == 2
    assert cache.get("a") == 1
    assert cache.delete_tag("t") == 2
    assert cache.get("a") is None and cache.get("b") is None
    assert cache.warm([("c", 3)]) == 1 and cache.get("c") == 3
    cache.close()


def test_l2_only_mode_keeps_nothing_in_the_process(make_cache: CacheFactory) -> None:
    cache = make_cache(mode="l2")
    calls: list[int] = []

    def loader() -> str:
        calls.append(1)
        return "v"

    assert cache.l1 is None
    assert cache.get_or_set("k", loader) == "v"
    assert cache.get_or_set("k", loader) == "v"
    assert calls == [1] and cache.counters.l2_hits == 1


def test_modes_that_need_redis_or_l1_refuse_to_start_without_them(tmp_path: Path) -> None:
    with pytest.raises(CacheConfigError, match="redis_url"):
        TieredCache(Settings(home_dir=tmp_path), mode="tiered")
    with pytest.raises(CacheConfigError, match="cache_l1_max_entries"):
        TieredCache(Settings(home_dir=tmp_path, cache_l1_max_entries=0), mode="l1")
    with pytest.raises(CacheConfigError, match="early_refresh"):
        TieredCache(Settings(home_dir=tmp_path), early_refresh=1.5)


def test_a_value_that_cannot_be_serialized_raises_to_the_caller(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()
    with pytest.raises(CacheSerializationError):
        cache.set("k", object())
    with pytest.raises(CacheSerializationError):
        cache.get_or_set("k", lambda: {1, 2})


def test_warm_stores_values_for_every_process_and_evicts_their_old_copies(
    make_cache: CacheFactory,
) -> None:
    a, b = make_cache(), make_cache()
    assert a.wait_coherent() and b.wait_coherent()
    a.set("p1", "old")
    assert b.get("p1") == "old"
    assert a.warm((f"p{i}", f"new{i}") for i in range(1, 1201)) == 1200
    assert a.l1 is not None and "p2" not in a.l1  # warming does not push out the hot set
    assert wait_until(lambda: b.l1 is not None and "p1" not in b.l1)
    assert b.get("p1") == "new1" and b.get("p1200") == "new1200"


def test_stats_and_metrics_count_hits_per_level_loads_evictions_and_invalidations(
    make_cache: CacheFactory,
    cache_name: str,
) -> None:
    def m(name: str, **labels: str) -> float:
        return metric(name, cache=cache_name, **labels)

    a, b = make_cache(l1_max_entries=2), make_cache(l1_max_entries=2)
    assert a.wait_coherent() and b.wait_coherent()
    a.set("x", 1)
    a.get("x")  # L1 hit
    b.get("x")  # L1 miss, L2 hit
    b.get_or_set("y", lambda: 2)  # L1 miss, L2 miss, load
    for key in ("p", "q", "r"):
        a.set(key, key)  # L1 holds 2: evictions
    stats_a, stats_b = a.stats(), b.stats()
    assert stats_a["l1_hits"] == 1 and stats_a["l1"]["evictions"] >= 2
    assert stats_a["l1"]["entries"] == 2
    assert (stats_b["l1_misses"], stats_b["l2_hits"], stats_b["l2_misses"]) == (2, 1, 1)
    assert stats_b["loads"] == 1 and stats_b["load_seconds"] > 0
    assert wait_until(lambda: b.stats()["invalidations_received"] >= 4)
    assert m("tasklab_cache_hits_total", level="l1") == 1
    assert m("tasklab_cache_hits_total", level="l2") == 1
    assert m("tasklab_cache_misses_total", level="l1") == 2
    assert m("tasklab_cache_misses_total", level="l2") == 1
    assert m("tasklab_cache_loader_calls_total") == 1
    assert m("tasklab_cache_loader_duration_seconds_count") == 1
    assert m("tasklab_cache_evictions_total") >= 2
    assert m("tasklab_cache_invalidations_received_total") >= 4
    assert m("tasklab_cache_redis_available") == 1
