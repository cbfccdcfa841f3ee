"""``@cached``: memoize a function (sync or async) in a :class:`TieredCache`.

    products = TieredCache(settings, name="products")

    @cached(products, ttl_s=60, key="product:{product_id}")
    def load_product(product_id: int) -> dict[str, Any] | None: ...

    @cached(products, ttl_s=60, key=lambda product_id: f"product:{product_id}")
    async def aload_product(product_id: int) -> dict[str, Any] | None: ...

``key`` is a format string over the function's arguments (by name, defaults applied), a callable
taking the same arguments, or omitted: then the key is the function's qualified name plus its
arguments as JSON. A None result is cached as "not found" for the cache's ``negative_ttl_s``.
``load_product.invalidate(42)`` deletes the entry for those arguments everywhere. On a method,
``self`` is an argument like any other: give a ``key`` template that leaves it out, and call
``Repo.method.invalidate(repo, 42)``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, overload

import orjson

from tasklab.cache.errors import CacheConfigError
from tasklab.cache.tiered import TieredCache

P = ParamSpec("P")
R = TypeVar("R")
KeySpec = str | Callable[..., str] | None
MAX_KEY_CHARS = 200  # longer default keys are hashed


class _KeyBuilder:
    def __init__(self, fn: Callable[..., Any], key: KeySpec) -> None:
        self.fn = fn
        self.key = key
        self.signature = inspect.signature(fn)
        self.prefix = f"{fn.__module__}.{fn.__qualname__}"

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        if callable(self.key):
            return self.key(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if isinstance(self.key, str):
            return self.key.format(**bound.arguments)
        return self._default_key(bound.arguments)

    def _default_key(self, arguments: dict[str, Any]) -> str:
        try:
            encoded = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError as e:
            raise CacheConfigError(
                f"cannot build a cache key for {self.prefix} from its arguments ({e}); pass "
                "key='...{arg}...' or key=callable to @cached"
            ) from e
        key = f"{self.prefix}:{encoded}"
        if len(key) > MAX_KEY_CHARS:
            key = f"{self.prefix}:#{hashlib.blake2b(encoded.encode(), digest_size=16).hexdigest()}"
        return key


class _Options:
    def __init__(
        self,
        cache: TieredCache,
        ttl_s: float | None,
        tags: Sequence[str],
        negative_ttl_s: float | None,
        lock: bool | None,
    ) -> None:
        self.cache = cache
        self.kwargs: dict[str, Any] = {
            "ttl_s": ttl_s,
            "tags": tuple(tags),
            "negative_ttl_s": negative_ttl_s,
            "lock": lock,
        }


class CachedFunction(Generic[P, R]):
    """A sync function whose results are cached. Call it like the function."""

    def __init__(self, fn: Callable[P, R], key: KeySpec, options: _Options) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.cache = options.cache
        self.key_for = _KeyBuilder(fn, key)
        self._kwargs = options.kwargs

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """On a class, bind like a method (``self`` is then part of the arguments)."""
        return self if instance is None else types.MethodType(self, instance)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.cache.get_or_set(
            self.key_for(*args, **kwargs), lambda: self.fn(*args, **kwargs), **self._kwargs
        )

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Delete the cached result for these arguments, in every process."""
        self.cache.delete(self.key_for(*args, **kwargs))


class AsyncCachedFunction(Generic[P, R]):
    """A coroutine function whose results are cached. Await it like the function."""

    def __init__(self, fn: Callable[P, Awaitable[R]], key: KeySpec, options: _Options) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.cache = options.cache
        self.key_for = _KeyBuilder(fn, key)
        self._kwargs = options.kwargs

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.cache.aget_or_set(
            self.key_for(*args, **kwargs), lambda: self.fn(*args, **kwargs), **self._kwargs
        )

    async def ainvalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        await self.cache.adelete(self.key_for(*args, **kwargs))


class _Decorator:
    def __init__(self, key: KeySpec, options: _Options) -> None:
        self.key = key
        self.options = options

    # A coroutine function also matches the sync overload; this one must win.
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            return AsyncCachedFunction(fn, self.key, self.options)
        return CachedFunction(fn, self.key, self.options)


def cached(
    cache: TieredCache,
    *,
    ttl_s: float | None = None,
    key: KeySpec = None,
    tags: Sequence[str] = (),
    negative_ttl_s: float | None = None,
    lock: bool | None = None,
) -> _Decorator:
    """Cache a function's results in ``cache`` (see the module docstring)."""
    return _Decorator(key, _Options(cache, ttl_s, tags, negative_ttl_s, lock))


__all__ = ["AsyncCachedFunction", "CachedFunction", "cached"]
