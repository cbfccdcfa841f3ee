"""Two-level cache: L1 in each process, L2 in Redis, coherent across processes.

Start with :class:`TieredCache` (``get``/``set``/``get_or_set``/``delete``/``delete_tag``/
``warm`` and their ``a*`` coroutine twins) and :func:`cached`. See docs/cache.md.
"""

from tasklab.cache.backends.memory import CacheEntry, MemoryBackend
from tasklab.cache.backends.redis import RedisBackend
from tasklab.cache.breaker import BreakerState, CircuitBreaker
from tasklab.cache.decorators import AsyncCachedFunction, CachedFunction, cached
from tasklab.cache.errors import CacheConfigError, CacheError, CacheSerializationError
from tasklab.cache.serialization import OrjsonSerializer, PickleSerializer, Serializer
from tasklab.cache.tiered import Mode, TieredCache
from tasklab.cache.warmup import WarmReport, WarmSource, beat_entry, warm_from

__all__ = [
    "AsyncCachedFunction",
    "BreakerState",
    "CacheConfigError",
    "CacheEntry",
    "CacheError",
    "CacheSerializationError",
    "CachedFunction",
    "CircuitBreaker",
    "MemoryBackend",
    "Mode",
    "OrjsonSerializer",
    "PickleSerializer",
    "RedisBackend",
    "Serializer",
    "TieredCache",
    "WarmReport",
    "WarmSource",
    "beat_entry",
    "cached",
    "warm_from",
]
