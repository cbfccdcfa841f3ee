"""Redis refusing writes by its state (OOM at maxmemory, READONLY after a failover) is an
outage to the cache: the breaker opens, and the deletes that failed are replayed once Redis
takes writes again, so no process keeps a deleted value in L1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tasklab.embedded import EmbeddedRedis
from tests.cache.conftest import CacheFactory
from tests.cache.support import wait_until
from tests.cache.test_outage import settings_for


@pytest.fixture
def admin(own_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(own_redis.url)
    yield client
    client.close()


def _refuse_writes(admin: redis.Redis, how: str) -> None:
    if how == "oom":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
    else:  # a replica of a primary that does not exist answers READONLY to writes
        admin.replicaof("127.0.0.1", "1")


def _take_writes(admin: redis.Redis, how: str) -> None:
    if how == "oom":
        admin.config_set("maxmemory", "0")
    else:
        admin.replicaof("NO", "ONE")


@pytest.mark.parametrize("how", ["oom", "readonly"])
def test_a_server_refusing_writes_opens_the_breaker_and_failed_deletes_are_replayed(
    own_redis: EmbeddedRedis,
    admin: redis.Redis,
    make_cache: CacheFactory,
    tmp_path: Path,
    how: str,
) -> None:
    settings = settings_for(own_redis.url, tmp_path)
    writer = make_cache(settings=settings, breaker_reset_s=0.3)
    reader = make_cache(settings=settings, breaker_reset_s=0.3)
    assert writer.wait_coherent() and reader.wait_coherent()
    writer.set("k", "old")
    assert reader.get("k") == "old"  # now in the reader's L1

    _refuse_writes(admin, how)
    for key in ("k", "k2", "k3"):
        writer.delete(key)
    assert writer.stats()["l2"]["available"] is False
    assert reader.get("k") == "old"  # the delete never reached Redis

    _take_writes(admin, how)
    assert wait_until(lambda: writer.get("probe") is None and writer.stats()["l2"]["available"])
    assert wait_until(lambda: reader.get("k") is None)
