"""The small pieces a ``TieredCache`` is built of: how a value is to be stored (``Plan``), what
a read of L2 found (``Seen``), the writes waiting for Redis (``PendingWrites``), and the checks
of its options."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from tasklab.cache.backends.memory import CacheEntry
from tasklab.cache.errors import CacheConfigError

Mode = Literal["tiered", "l1", "l2"]
PENDING_MAX_KEYS = 10_000  # failed writes remembered for replay; beyond, the namespace is cleared


@dataclass(frozen=True, slots=True)
class Plan:
    """How to store what a loader returns."""

    ttl_s: float | None
    l1_ttl_s: float | None
    tags: tuple[str, ...]
    negative_ttl_s: float | None
    lock: bool


@dataclass(frozen=True, slots=True)
class Seen:
    """What a read of L2 found: a usable entry, and the raw bytes (None: absent, or Redis down)
    that a later store must still find there."""

    entry: CacheEntry | None
    raw: bytes | None


UNSEEN = Seen(None, None)


class PendingWrites:
    """Keys and tags whose write or delete could not reach Redis, replayed as deletes later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.keys: set[str] = set()
        self.tags: set[str] = set()
        self.everything = False

    def __len__(self) -> int:
        return len(self.keys) + len(self.tags) + self.everything

    def add(
        self, keys: Iterable[str] = (), tags: Iterable[str] = (), everything: bool = False
    ) -> None:
        with self._lock:
            self.keys.update(keys)
            self.tags.update(tags)
            if everything or len(self.keys) > PENDING_MAX_KEYS:
                self.everything = True
                self.keys.clear()
                self.tags.clear()

    def take(self) -> tuple[set[str], set[str], bool]:
        with self._lock:
            taken = (self.keys, self.tags, self.everything)
            self.keys, self.tags, self.everything = set(), set(), False
        return taken


def resolve_mode(mode: Mode | None, redis_url: str | None, l1_max_entries: int) -> Mode:
    if mode is None:
        mode = "l1" if not redis_url else "l2" if l1_max_entries == 0 else "tiered"
    if mode not in ("tiered", "l1", "l2"):
        raise CacheConfigError(f"unknown cache mode {mode!r}; expected tiered, l1 or l2")
    if mode != "l1" and not redis_url:
        raise CacheConfigError(f"cache mode {mode!r} needs redis_url")
    if mode != "l2" and l1_max_entries < 1:
        raise CacheConfigError(f"cache mode {mode!r} needs cache_l1_max_entries >= 1")
    return mode


def check_options(
    ttl_s: float, negative_ttl_s: float, lock_ttl_s: float, early_refresh: float | None
) -> None:
    if ttl_s <= 0:
        raise CacheConfigError(f"ttl_s must be > 0, got {ttl_s}")
    if negative_ttl_s < 0:
        raise CacheConfigError(f"negative_ttl_s must be >= 0 (0 disables), got {negative_ttl_s}")
    if lock_ttl_s <= 0:
        raise CacheConfigError(f"lock_ttl_s must be > 0, got {lock_ttl_s}")
    if early_refresh is not None and not 0 < early_refresh <= 1:
        raise CacheConfigError(
            f"early_refresh is a fraction of the TTL in (0, 1], got {early_refresh}"
        )


def ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def chunks(items: Iterable[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


__all__ = ["UNSEEN", "Mode", "PendingWrites", "Plan", "Seen"]
