"""Cache levels: :mod:`memory` (L1, per process) and :mod:`redis` (L2, shared)."""

from tasklab.cache.backends.memory import CacheEntry, MemoryBackend
from tasklab.cache.backends.redis import RedisBackend

__all__ = ["CacheEntry", "MemoryBackend", "RedisBackend"]
