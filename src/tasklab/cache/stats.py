"""Per-cache counters: plain integers for ``stats()``, Prometheus series for scraping.

Every lookup is counted once: as an L1 hit, or as an L1 miss (or skip) plus an L2 hit, miss or
error. A lookup skips L1 when L1 is not trusted (invalidation channel down) or absent (L2-only).
"""

from __future__ import annotations

import threading
from typing import Any

from tasklab.observe.metrics import (
    CACHE_HITS,
    CACHE_INVALIDATIONS,
    CACHE_LOAD_DURATION,
    CACHE_LOADS,
    CACHE_MISSES,
)


class CacheCounters:
    def __init__(self, cache: str) -> None:
        self.gets = 0
        self.l1_hits = 0
        self.l1_misses = 0
        self.l2_hits = 0
        self.l2_misses = 0
        self.negative_hits = 0
        self.loads = 0
        self.load_seconds = 0.0
        self.invalidations = 0
        self._lock = threading.Lock()
        self._l1_hit = CACHE_HITS.labels(cache=cache, level="l1")
        self._l1_miss = CACHE_MISSES.labels(cache=cache, level="l1")
        self._l2_hit = CACHE_HITS.labels(cache=cache, level="l2")
        self._l2_miss = CACHE_MISSES.labels(cache=cache, level="l2")
        self._loads = CACHE_LOADS.labels(cache=cache)
        self._load_duration = CACHE_LOAD_DURATION.labels(cache=cache)
        self._invalidations = CACHE_INVALIDATIONS.labels(cache=cache)

    def hit_l1(self, negative: bool) -> None:
        with self._lock:
            self.gets += 1
            self.l1_hits += 1
            self.negative_hits += negative
        self._l1_hit.inc()

    def lookup(
        self, *, l1_missed: bool, l2: str | None, hit_l1: bool = False, negative: bool = False
    ) -> None:
        """A lookup past L1. ``l2`` is "hit", "miss", "error" or None (no L2)."""
        with self._lock:
            self.gets += 1
            self.l1_misses += l1_missed
            self.l1_hits += hit_l1
            self.l2_hits += l2 == "hit"
            self.l2_misses += l2 == "miss"
            self.negative_hits += negative
        if l1_missed:
            self._l1_miss.inc()
        if hit_l1:
            self._l1_hit.inc()
        if l2 == "hit":
            self._l2_hit.inc()
        elif l2 == "miss":
            self._l2_miss.inc()

    def load(self, duration_s: float) -> None:
        with self._lock:
            self.loads += 1
            self.load_seconds += duration_s
        self._loads.inc()
        self._load_duration.observe(duration_s)

    def invalidation(self) -> None:
        with self._lock:
            self.invalidations += 1
        self._invalidations.inc()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            hits = self.l1_hits + self.l2_hits
            return {
                "gets": self.gets,
                "hit_rate": hits / self.gets if self.gets else 0.0,
                "l1_hits": self.l1_hits,
                "l1_misses": self.l1_misses,
                "l2_hits": self.l2_hits,
                "l2_misses": self.l2_misses,
                "negative_hits": self.negative_hits,
                "loads": self.loads,
                "load_seconds": self.load_seconds,
                "invalidations_received": self.invalidations,
            }

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()


__all__ = ["CacheCounters"]
