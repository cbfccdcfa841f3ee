from __future__ import annotations

from typing import Any

import pytest

from tasklab.cache import CacheConfigError, cached
from tests.cache.conftest import CacheFactory


def test_a_cached_function_runs_once_per_distinct_arguments(make_cache: CacheFactory) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cached(cache, ttl_s=60, key="product:{product_id}")
    def product(product_id: int) -> dict[str, Any]:
        calls.append(product_id)
        return {"id": product_id}

    assert product(1) == {"id": 1} and product(1) == {"id": 1} and product(2) == {"id": 2}
    assert calls == [1, 2]
    assert product.key_for(1) == "product:1"
    assert vars(product)["__name__"] == "product"  # functools.update_wrapper


def test_key_templates_see_defaults_and_callables_get_the_arguments(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()

    @cached(cache, key="page:{category}:{page}")
    def listing(category: str, page: int = 1) -> list[int]:
        return [page]

    @cached(cache, key=lambda user_id, **_: f"user:{user_id}")
    def user(user_id: int, *, fresh: bool = False) -> str:
        return "u"

    assert listing.key_for("tea") == "page:tea:1"
    assert user.key_for(7, fresh=True) == "user:7"


def test_the_default_key_is_the_function_and_its_arguments(make_cache: CacheFactory) -> None:
    cache = make_cache()

    @cached(cache)
    def add(a: int, b: int = 2) -> int:
        return a + b

    assert add(1) == 3
    assert add.key_for(1) == add.key_for(a=1, b=2)
    assert add.key_for(1) != add.key_for(2)
    assert add.key_for(1).startswith(f"{__name__}.")
    with pytest.raises(CacheConfigError, match="key="):
        add.key_for(object())


def test_a_none_result_is_cached_as_not_found(make_cache: CacheFactory) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cached(cache, key="missing:{x}")
    def find(x: int) -> int | None:
        calls.append(x)
        return None

    assert find(1) is None and find(1) is None
    assert calls == [1]


async def test_an_async_function_is_cached_and_can_be_invalidated(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cached(cache, ttl_s=60, key="a:{x}")
    async def fetch(x: int) -> int:
        calls.append(x)
        return x * 10

    assert await fetch(3) == 30 and await fetch(3) == 30
    assert calls == [3]
    await fetch.ainvalidate(3)
    assert await fetch(3) == 30 and calls == [3, 3]
    await cache.aclose()


def test_invalidate_deletes_the_entry_for_those_arguments(make_cache: CacheFactory) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cached(cache, key="i:{x}")
    def f(x: int) -> int:
        calls.append(x)
        return x

    f(1)
    f(2)
    f.invalidate(1)
    f(1)
    f(2)
    assert calls == [1, 2, 1]


def test_a_cached_method_binds_self_and_keys_on_the_other_arguments(
    make_cache: CacheFactory,
) -> None:
    cache = make_cache()
    calls: list[int] = []

    class Repo:
        @cached(cache, key="repo:{product_id}")
        def product(self, product_id: int) -> int:
            calls.append(product_id)
            return product_id

    assert Repo().product(5) == 5 and Repo().product(5) == 5
    assert calls == [5]
    Repo.product.invalidate(Repo(), 5)
    assert Repo().product(5) == 5 and calls == [5, 5]
