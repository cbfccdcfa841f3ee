"""L1: a bounded, thread-safe LRU with a TTL per entry, living in one process.

Values are kept as Python objects (already decoded), so a hit costs a dict lookup under a lock.
Expired entries are dropped when touched or pushed out by the LRU; both count as evictions.

L1 copies must never be older than what Redis holds. Two protocols keep it so:

* Readers (``begin_fill``/``finish_fill``): a reader fetches the old value from Redis, the
  invalidation arrives, then the reader would store the old value. Any write, delete or
  invalidation of the key in between cancels the fill; so does a writer already in progress.
* Writers (``begin_write``/``finish_write``), called around the write to Redis: a writer cancels
  the fills in flight, and stores its value at the end only if no other write, delete or
  invalidation of the key overlapped it (two overlapping writers cannot tell which Redis write
  landed last). A writer that may not store removes the key instead: a miss, never a stale hit.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tasklab.cache.errors import CacheConfigError
from tasklab.observe.metrics import CACHE_EVICTIONS, CACHE_L1_SIZE


@dataclass(slots=True)
class CacheEntry:
    """One L1 entry. ``value`` None is a cached "not found"."""

    value: Any
    expires_at: float  # on the backend's monotonic clock
    written_at: float = 0.0  # epoch seconds, when the value was stored (by any process)
    ttl_s: float = 0.0  # the shared TTL; early refresh is a fraction of it
    tags: tuple[str, ...] = ()
    suspect: bool = False  # written while Redis was unreachable; dropped when it is back

    def refresh_due(self, ratio: float, now: float) -> bool:
        """True once ``ratio`` of the entry's shared TTL has passed at epoch time ``now``."""
        return now >= self.written_at + ratio * self.ttl_s


class MemoryBackend:
    """Bounded LRU + TTL. Every method is safe to call from any thread."""

    def __init__(
        self,
        *,
        max_entries: int,
        name: str = "default",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise CacheConfigError(f"L1 needs max_entries >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.clock = clock
        self.evictions = 0
        self._data: OrderedDict[str, CacheEntry] = OrderedDict()
        self._tags: dict[str, set[str]] = {}
        self._fills: dict[str, set[object]] = {}  # tokens still allowed to store
        self._writers: dict[str, set[object]] = {}  # writes to Redis in progress
        self._lock = threading.Lock()
        self._evictions_metric = CACHE_EVICTIONS.labels(cache=name)
        self._size_metric = CACHE_L1_SIZE.labels(cache=name)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.peek(key) is not None

    def expires_at(self, ttl_s: float) -> float:
        return self.clock() + ttl_s

    # --- reads ------------------------------------------------------------------------------
    def get(self, key: str) -> CacheEntry | None:
        """The live entry for ``key`` (marking it most recently used), or None."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry.expires_at <= self.clock():
                self._remove(key, entry)
                self._count_evictions(1)
                self._size_metric.set(len(self._data))
                return None
            self._data.move_to_end(key)
            return entry

    def peek(self, key: str) -> CacheEntry | None:
        """Like ``get`` without touching the LRU order or evicting."""
        with self._lock:
            entry = self._data.get(key)
        return entry if entry is not None and entry.expires_at > self.clock() else None

    # --- writes -----------------------------------------------------------------------------
    def set(self, key: str, entry: CacheEntry) -> None:
        with self._lock:
            self._fills.pop(key, None)
            self._put(key, entry)

    def begin_fill(self, key: str) -> object:
        """Call before reading ``key`` from L2; pass the token to ``finish_fill``."""
        token = object()
        with self._lock:
            if key not in self._writers:
                self._fills.setdefault(key, set()).add(token)
        return token

    def begin_write(self, key: str) -> object:
        """Call before writing ``key`` to L2; always pass the token to ``finish_write``."""
        token = object()
        with self._lock:
            writers = self._writers.setdefault(key, set())
            writers.add(token)
            self._fills.pop(key, None)
            if len(writers) == 1:
                self._fills[key] = {token}
        return token

    def finish_write(self, key: str, token: object, entry: CacheEntry | None) -> bool:
        """Store ``entry`` if nothing overlapped this write; otherwise remove ``key``."""
        with self._lock:
            writers = self._writers.get(key)
            if writers is not None:
                writers.discard(token)
                if not writers:
                    del self._writers[key]
            allowed = token in self._fills.get(key, ())
            self._fills.pop(key, None)
            if entry is not None and allowed:
                self._put(key, entry)
                return True
            old = self._data.get(key)
            if old is not None:
                self._remove(key, old)
                self._size_metric.set(len(self._data))
            return False

    def finish_fill(self, key: str, token: object, entry: CacheEntry | None) -> bool:
        """Store ``entry`` unless ``key`` was written or invalidated since ``begin_fill``.

        Pass ``entry=None`` to just retire the token (nothing to store)."""
        with self._lock:
            tokens = self._fills.get(key)
            if tokens is None or token not in tokens:
                return False
            tokens.discard(token)
            if not tokens:
                del self._fills[key]
            if entry is None:
                return False
            self._put(key, entry)
            return True

    def delete(self, key: str) -> bool:
        return self.delete_many((key,)) == 1

    def delete_many(self, keys: Iterable[str]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                self._fills.pop(key, None)
                entry = self._data.get(key)
                if entry is not None:
                    self._remove(key, entry)
                    removed += 1
            self._size_metric.set(len(self._data))
        return removed

    def delete_tag(self, tag: str) -> list[str]:
        """Remove the entries stored with ``tag`` in this process; return their keys."""
        with self._lock:
            keys = list(self._tags.get(tag, ()))
        self.delete_many(keys)
        return keys

    def clear(self) -> int:
        with self._lock:
            n = len(self._data)
            self._data.clear()
            self._tags.clear()
            self._fills.clear()
            self._size_metric.set(0)
        return n

    def drop_suspect(self) -> int:
        """Remove the entries written while Redis was unreachable."""
        with self._lock:
            suspects = [k for k, e in self._data.items() if e.suspect]
        return self.delete_many(suspects)

    # --- internals (lock held) ----------------------------------------------------------------
    def _put(self, key: str, entry: CacheEntry) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._untag(key, old)
        self._data[key] = entry
        for tag in entry.tags:
            self._tags.setdefault(tag, set()).add(key)
        evicted = 0
        while len(self._data) > self.max_entries:
            old_key, old_entry = self._data.popitem(last=False)
            self._untag(old_key, old_entry)
            evicted += 1
        if evicted:
            self._count_evictions(evicted)
        self._size_metric.set(len(self._data))

    def _remove(self, key: str, entry: CacheEntry) -> None:
        del self._data[key]
        self._untag(key, entry)

    def _untag(self, key: str, entry: CacheEntry) -> None:
        for tag in entry.tags:
            keys = self._tags.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tags[tag]

    def _count_evictions(self, n: int) -> None:
        self.evictions += n
        self._evictions_metric.inc(n)


__all__ = ["CacheEntry", "MemoryBackend"]
