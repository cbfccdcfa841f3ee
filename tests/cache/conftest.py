from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tasklab.cache import TieredCache
from tasklab.embedded import EmbeddedRedis
from tasklab.settings import Settings

CacheFactory = Callable[..., TieredCache]


@pytest.fixture
def cache_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_cache(settings: Settings, cache_name: str) -> Iterator[CacheFactory]:
    """Build caches (default: the test's Redis, the test's cache name); closed at teardown."""
    made: list[TieredCache] = []

    def make(**options: Any) -> TieredCache:
        options.setdefault("name", cache_name)
        cache = TieredCache(options.pop("settings", settings), **options)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis only this test uses, so it can stop and restart it."""
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start()
    yield server
    server.stop()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
