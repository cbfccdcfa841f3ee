"""Coherence between real OS processes sharing one Redis."""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tasklab.embedded import EmbeddedRedis
from tasklab.settings import Settings
from tests.cache.conftest import CacheFactory
from tests.cache.support import CacheProcess, forked_child, wait_until

COHERENCE_BOUND_S = 0.100


@pytest.fixture(scope="module")
def children(embedded_redis: EmbeddedRedis) -> Iterator[list[CacheProcess]]:
    """Three spawned processes, each able to hold caches; shared by this module's tests."""
    procs = [CacheProcess(embedded_redis.url) for _ in range(3)]
    yield procs
    for proc in procs:
        proc.stop()


def open_everywhere(children: list[CacheProcess], name: str, **options: object) -> None:
    assert all(child.call("open", name, options) for child in children)


@pytest.mark.parametrize("change", ["set", "delete", "delete_tag"])
def test_a_change_in_one_process_evicts_the_key_from_every_other_process_within_100ms(
    children: list[CacheProcess],
    make_cache: CacheFactory,
    cache_name: str,
    change: str,
) -> None:
    writer = make_cache()
    assert writer.wait_coherent()
    writer.set("k", "v1", tags=["g"])
    open_everywhere(children, cache_name)
    assert [child.call("fill", cache_name, ["k"]) for child in children] == [[True]] * 3
    for child in children:
        child.call("watch", cache_name, ["k"], 2.0)

    started = time.monotonic()
    if change == "set":
        writer.set("k", "v2")
    elif change == "delete":
        writer.delete("k")
    else:
        writer.delete_tag("g")

    evicted_at = [child.call("watched", cache_name) for child in children]
    assert None not in evicted_at, "a process kept its L1 copy"
    delays_s = [at - started for at in evicted_at]
    assert max(delays_s) < COHERENCE_BOUND_S, delays_s
    expected = "v2" if change == "set" else None
    assert [child.call("get", cache_name, "k") for child in children] == [expected] * 3


def stampede(children: list[CacheProcess], name: str) -> list[dict[str, object]]:
    start_at = time.monotonic() + 0.5  # CLOCK_MONOTONIC is shared by every process
    for child in children:
        child.send("stampede", name, "hot", 100, start_at, 0.3)
    return [child.receive() for child in children]


def test_100_concurrent_misses_in_each_process_load_at_most_once_per_process(
    children: list[CacheProcess],
    cache_name: str,
    redis_url: str,
) -> None:
    open_everywhere(children, cache_name)
    results = stampede(children, cache_name)
    assert all(r["answered"] == 100 and r["results"] == ["loaded"] for r in results)
    per_process = [int(r["calls"]) for r in results]  # type: ignore[call-overload]
    assert all(calls <= 1 for calls in per_process), per_process
    total = int(redis.Redis.from_url(redis_url).get(f"test:loads:{cache_name}:hot") or 0)
    assert total == sum(per_process) >= 1


def test_with_the_lock_concurrent_misses_in_three_processes_load_exactly_once(
    children: list[CacheProcess],
    cache_name: str,
    redis_url: str,
) -> None:
    open_everywhere(children, cache_name, lock=True)
    results = stampede(children, cache_name)
    assert all(r["answered"] == 100 and r["results"] == ["loaded"] for r in results)
    total = int(redis.Redis.from_url(redis_url).get(f"test:loads:{cache_name}:hot") or 0)
    assert total == 1
    assert sorted(r["calls"] for r in results) == [0, 0, 1]  # type: ignore[type-var]


def test_losing_the_invalidation_channel_clears_l1_and_reads_go_to_redis_until_it_is_back(
    make_cache: CacheFactory,
    own_redis: EmbeddedRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its own Redis: the ACL change and the killed connections must not touch other tests.
    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url=own_redis.url)
    a, b = make_cache(settings=settings), make_cache(settings=settings)
    assert a.wait_coherent() and b.wait_coherent()
    assert a.l1 is not None
    a.set("k", "v1")
    assert "k" in a.l1
    admin = redis.Redis.from_url(own_redis.url)
    caplog.set_level(logging.WARNING, logger="tasklab.cache")
    # Refuse SUBSCRIBE and drop the subscriptions: data commands keep working.
    admin.execute_command("ACL", "SETUSER", "default", "-subscribe")
    try:
        admin.client_kill_filter(_type="pubsub")
        assert wait_until(lambda: not a.coherent, timeout_s=2)
        assert "k" not in a.l1  # cleared: notices may have been missed
        assert a.get("k") == "v1" and "k" not in a.l1  # served by Redis, L1 bypassed
        b.set("k", "v2")  # its notice cannot reach a; a must not serve v1 anyway
        assert a.get("k") == "v2"
        a.set("mine", 1)
        assert "mine" not in a.l1
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+subscribe")
        admin.close()
    assert a.wait_coherent(5)
    assert a.get("k") == "v2" and "k" in a.l1
    messages = [r.getMessage() for r in caplog.records if a.name in r.getMessage()]
    assert any("invalidation channel down" in m for m in messages)
    assert any("invalidation channel is back" in m for m in messages)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_cache_inherited_through_fork_stays_coherent_in_the_child(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()
    assert cache.wait_coherent()
    cache.set("k", "v1")
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=forked_child, args=(cache, child_conn, "k"))
    child.start()
    try:
        assert parent_conn.poll(15)
        assert parent_conn.recv() == ("filled", True, "v1")
        started = time.monotonic()
        cache.set("k", "v2")
        assert parent_conn.poll(15)
        kind, evicted_at, value = parent_conn.recv()
        assert kind == "evicted", evicted_at
        assert evicted_at is not None and evicted_at - started < COHERENCE_BOUND_S
        assert value == "v2"
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
