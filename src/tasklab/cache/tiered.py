"""TieredCache: L1 in this process, L2 in Redis, kept coherent, safe when Redis is not.

Reads try L1, then L2 (filling L1), then the loader (``get_or_set``), which runs once per key
per process at a time (single-flight) and, with ``lock=True``, once across processes. Writes go
to L2 first, with an invalidation notice in the same round trip, then to this process's L1.

Modes: ``tiered`` (default when ``redis_url`` is set), ``l1`` (no Redis: per-process only, no
coherence between processes) and ``l2`` (Redis only, e.g. for processes with little reuse).

Trust rules, all tested:

* L1 is used only while the invalidation subscription is up. When it drops, L1 is cleared and
  bypassed (reads go to Redis) until a fresh SUBSCRIBE succeeds, which clears it again.
* If Redis itself is unreachable (circuit open), L1 is the only cache left: it serves and stores,
  marking what it stores as suspect. When Redis answers again, suspect entries are dropped and
  the writes and deletes that could not reach Redis are replayed as deletes.
* A loaded value is stored only if nothing changed the key since the load began: deletes leave a
  tombstone for ``lock_ttl_s`` and the store is a compare-and-set against what was seen.
* Redis trouble never raises to the caller; a value that cannot be serialized does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from tasklab.cache.backends.memory import CacheEntry, MemoryBackend
from tasklab.cache.backends.redis import UNLESS_DELETED, RedisBackend, StoredItem
from tasklab.cache.errors import CacheConfigError, CacheSerializationError, L2Unavailable
from tasklab.cache.invalidation import InvalidationListener, Notice, encode_clear, encode_notice
from tasklab.cache.serialization import Codec, Envelope, Serializer, serializer_for
from tasklab.cache.singleflight import AsyncSingleFlight, SingleFlight
from tasklab.cache.stats import CacheCounters
from tasklab.settings import Settings

logger = logging.getLogger("tasklab.cache")
T = TypeVar("T")
Mode = Literal["tiered", "l1", "l2"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # part of Redis keys and client names
LOCK_POLL_MIN_S = 0.002  # waiting for another process's loader: first poll of L2
LOCK_POLL_MAX_S = 0.02
WARM_BATCH = 500  # keys per pipeline in warm()
PENDING_MAX_KEYS = 10_000  # failed writes remembered for replay; beyond, the namespace is cleared


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to store what a loader returns."""

    ttl_s: float | None
    l1_ttl_s: float | None
    tags: tuple[str, ...]
    negative_ttl_s: float | None
    lock: bool


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a read of L2 found: a usable entry, and the raw bytes (None: absent, or Redis down)
    that a later store must still find there."""

    entry: CacheEntry | None
    raw: bytes | None


_UNSEEN = _Seen(None, None)


class _PendingWrites:
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


class TieredCache:
    """A named two-level cache. Build one per kind of data, share it across threads, close it.

    ``settings`` supplies ``redis_url``, ``cache_l1_max_entries`` and ``cache_default_ttl_s``;
    keyword options override them. ``lock=True`` makes ``get_or_set`` coordinate loaders
    across processes; ``lock_ttl_s`` is the longest a loader may take (it bounds that lock and
    how long a delete fences off slower loads). ``early_refresh=0.8`` reloads a value once 80 %
    of its TTL has passed while other callers keep getting the current one.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "default",
        mode: Mode | None = None,
        l1_max_entries: int | None = None,
        ttl_s: float | None = None,
        negative_ttl_s: float = 30.0,
        serializer: str | Serializer = "orjson",
        allow_pickle: bool = False,
        lock: bool = False,
        lock_ttl_s: float = 10.0,
        early_refresh: float | None = None,
        redis_timeout_s: float = 0.25,
        breaker_threshold: int = 3,
        breaker_reset_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        l1_max = settings.cache_l1_max_entries if l1_max_entries is None else l1_max_entries
        if not NAME_PATTERN.fullmatch(name):
            raise CacheConfigError(f"cache name {name!r} must match {NAME_PATTERN.pattern}")
        self.name = name
        self.mode: Mode = _resolve_mode(mode, settings.redis_url, l1_max)
        self.default_ttl_s = settings.cache_default_ttl_s if ttl_s is None else ttl_s
        _check_options(self.default_ttl_s, negative_ttl_s, lock_ttl_s, early_refresh)
        self.negative_ttl_s = negative_ttl_s
        self.lock = lock
        self.lock_ttl_s = lock_ttl_s
        self.early_refresh = early_refresh
        self.clock = clock  # epoch seconds: stored with values, compared across processes
        self.counters = CacheCounters(name)
        self._codec = Codec(serializer_for(serializer, allow_pickle=allow_pickle))
        self._redis_url = settings.redis_url or ""
        self.l1 = MemoryBackend(max_entries=l1_max, name=name) if self.mode != "l2" else None
        self.l2: RedisBackend | None = None
        if self.mode != "l1":
            self.l2 = RedisBackend(
                self._redis_url,
                cache=name,
                timeout_s=redis_timeout_s,
                failure_threshold=breaker_threshold,
                reset_s=breaker_reset_s,
            )
            self.l2.on_recovered = self._l2_recovered
        self._closed = False
        self._warned_decode = False
        self._init_process_state(start_listener=True)
        _reset_in_forked_children(self)

    def _init_process_state(self, *, start_listener: bool) -> None:
        """State a forked child must not share: identity, locks, flights, the listener."""
        self._sender = uuid.uuid4().hex[:16]
        self._flights = SingleFlight()
        self._aflights = AsyncSingleFlight()
        self._pending = _PendingWrites()
        self._listener: InvalidationListener | None = None
        self._listener_lock = threading.Lock()
        self._coherent = self.mode == "l1"
        self._coherent_event = threading.Event()
        if self._coherent:
            self._coherent_event.set()
        if start_listener and self.mode == "tiered":
            self._start_listener()

    # --- public, sync ---------------------------------------------------------------------------
    def get(self, key: str) -> Any:
        """The cached value, or None when absent (or cached as "not found")."""
        entry = self._lookup(key)
        return None if entry is None else entry.value

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl_s: float | None = None,
        l1_ttl_s: float | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        """Store ``value`` (None caches "not found", by default for ``negative_ttl_s``)."""
        item, entry = self._prepare(key, value, self._write_plan(value, ttl_s, l1_ttl_s, tags))
        token = self._begin_write(key)
        stored: bool | None = False
        try:
            stored = self._l2_set(item)
        finally:
            self._finish_write(key, token, entry, stored)

    def delete(self, key: str) -> None:
        """Delete ``key`` here, in Redis and in every other process's L1."""
        if self.l2 is not None:
            try:
                self.l2.delete(
                    [key], notice=encode_notice(self._sender, [key]), **self._tombstone()
                )
            except L2Unavailable:
                self._pending.add(keys=[key])
        if self.l1 is not None:
            self.l1.delete(key)

    def delete_tag(self, tag: str) -> int:
        """Delete every key stored with ``tag`` everywhere; return how many were found."""
        keys: list[str] = []
        if self.l2 is not None:
            try:
                keys = self.l2.delete_tag(tag, sender=self._sender, **self._tombstone())
            except L2Unavailable:
                self._pending.add(tags=[tag])
        return self._l1_delete_tag(tag, keys)

    def clear(self) -> None:
        """Remove every entry of this cache, in Redis and in every process's L1."""
        if self.l2 is not None:
            try:
                self.l2.clear(notice=encode_clear(self._sender))
            except L2Unavailable:
                self._pending.add(everything=True)
        if self.l1 is not None:
            self.l1.clear()

    def get_or_set(
        self,
        key: str,
        loader: Callable[[], T],
        *,
        ttl_s: float | None = None,
        l1_ttl_s: float | None = None,
        tags: Sequence[str] = (),
        negative_ttl_s: float | None = None,
        lock: bool | None = None,
        early_refresh: float | None = None,
    ) -> T:
        """The cached value, else ``loader()`` stored and returned (None: cached "not found").

        Concurrent misses in this process share one ``loader()`` call; with ``lock`` (default:
        the cache's ``lock``), processes share one through a Redis lock. Loader errors propagate
        and are not cached.
        """
        entry = self._lookup(key)
        if entry is not None and not self._refresh_due(entry, early_refresh):
            return cast(T, entry.value)
        plan = self._plan(ttl_s, l1_ttl_s, tags, negative_ttl_s, lock)
        if entry is not None:
            return self._refresh(key, entry, loader, plan)
        return self._flights.do(key, lambda: self._load(key, loader, plan))

    def warm(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        ttl_s: float | None = None,
        l1_ttl_s: float | None = None,
        tags: Sequence[str] = (),
    ) -> int:
        """Store ``(key, value)`` pairs in Redis (batched) for every process to read.

        Other processes' L1 copies of these keys are invalidated; this process's L1 is not
        filled (warming a large set must not push the hot set out). A key deleted while the
        values were being read (tombstone present) is skipped. In ``l1`` mode the values go to
        L1. Returns how many values were sent (0 while Redis is unreachable).
        """
        plan = self._plan(ttl_s, l1_ttl_s, tags, None, False)
        stored = 0
        for chunk in _chunks(items, WARM_BATCH):
            stored += self._warm_chunk([self._prepare(k, v, plan) for k, v in chunk])
        return stored

    # --- public, asyncio ------------------------------------------------------------------------
    async def aget(self, key: str) -> Any:
        entry = await self._alookup(key)
        return None if entry is None else entry.value

    async def aset(
        self,
        key: str,
        value: Any,
        *,
        ttl_s: float | None = None,
        l1_ttl_s: float | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        item, entry = self._prepare(key, value, self._write_plan(value, ttl_s, l1_ttl_s, tags))
        token = self._begin_write(key)
        stored: bool | None = False
        try:
            stored = await self._al2_set(item)
        finally:
            self._finish_write(key, token, entry, stored)

    async def adelete(self, key: str) -> None:
        if self.l2 is not None:
            try:
                await self.l2.adelete(
                    [key], notice=encode_notice(self._sender, [key]), **self._tombstone()
                )
            except L2Unavailable:
                self._pending.add(keys=[key])
        if self.l1 is not None:
            self.l1.delete(key)

    async def adelete_tag(self, tag: str) -> int:
        keys: list[str] = []
        if self.l2 is not None:
            try:
                keys = await self.l2.adelete_tag(tag, sender=self._sender, **self._tombstone())
            except L2Unavailable:
                self._pending.add(tags=[tag])
        return self._l1_delete_tag(tag, keys)

    async def aget_or_set(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl_s: float | None = None,
        l1_ttl_s: float | None = None,
        tags: Sequence[str] = (),
        negative_ttl_s: float | None = None,
        lock: bool | None = None,
        early_refresh: float | None = None,
    ) -> T:
        """``get_or_set`` for coroutines: ``loader`` is an async callable."""
        entry = await self._alookup(key)
        if entry is not None and not self._refresh_due(entry, early_refresh):
            return cast(T, entry.value)
        plan = self._plan(ttl_s, l1_ttl_s, tags, negative_ttl_s, lock)
        if entry is not None:
            return await self._arefresh(key, entry, loader, plan)
        return await self._aflights.do(key, lambda: self._aload(key, loader, plan))

    # --- state, lifecycle -----------------------------------------------------------------------
    @property
    def coherent(self) -> bool:
        """True while L1 is trusted (always in ``l1`` mode, never in ``l2`` mode)."""
        return self._coherent

    def wait_coherent(self, timeout_s: float = 5.0) -> bool:
        """Wait until the invalidation subscription is up (L1 in use). False on timeout."""
        if self.mode == "tiered" and self._listener is None:
            self._start_listener()
        return self._coherent_event.wait(timeout_s)

    def stats(self) -> dict[str, Any]:
        """Counters since start, L1 size, L2 availability. Same numbers as the metrics."""
        out: dict[str, Any] = {
            "name": self.name,
            "mode": self.mode,
            "coherent": self._coherent,
            **self.counters.snapshot(),
            "pending_replays": len(self._pending),
        }
        out["l1"] = (
            None
            if self.l1 is None
            else {
                "entries": len(self.l1),
                "max_entries": self.l1.max_entries,
                "evictions": self.l1.evictions,
            }
        )
        out["l2"] = (
            None
            if self.l2 is None
            else {
                "available": self.l2.available,
                "state": self.l2.breaker.state.value,
                "errors": self.l2.errors,
            }
        )
        return out

    def close(self) -> None:
        """Stop the listener and close Redis connections. Idempotent. Afterwards the cache
        still answers, without L1 (nothing keeps it coherent any more)."""
        self._closed = True
        if self.mode == "tiered":
            self._coherent = False
            self._coherent_event.clear()
        if self._listener is not None:
            self._listener.stop()
        if self.l2 is not None:
            self.l2.close()

    async def aclose(self) -> None:
        """``close()``, plus the asyncio connections of the running loop."""
        self.close()
        if self.l2 is not None:
            await self.l2.aclose()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- lookups --------------------------------------------------------------------------------
    def _l1_readable(self) -> bool:
        """L1 may serve when it is coherent, or when Redis is down and it is all there is."""
        if self._coherent:
            return True
        if self._listener is None:  # first use in a forked child
            self._start_listener()
        return self.l2 is not None and not self.l2.available

    def _lookup(self, key: str) -> CacheEntry | None:
        l1 = self.l1
        l1_missed = False
        if l1 is not None and self._l1_readable():
            entry = l1.get(key)
            if entry is not None:
                self.counters.hit_l1(entry.value is None)
                return entry
            l1_missed = True
        if self.l2 is None:
            self.counters.lookup(l1_missed=l1_missed, l2=None)
            return None
        try:
            entry = self._fetch_l2(key).entry
        except L2Unavailable:
            return self._fallback(key, l1_missed=l1_missed)
        self._count_l2(entry, l1_missed)
        return entry

    async def _alookup(self, key: str) -> CacheEntry | None:
        l1 = self.l1
        l1_missed = False
        if l1 is not None and self._l1_readable():
            entry = l1.get(key)
            if entry is not None:
                self.counters.hit_l1(entry.value is None)
                return entry
            l1_missed = True
        if self.l2 is None:
            self.counters.lookup(l1_missed=l1_missed, l2=None)
            return None
        try:
            entry = (await self._afetch_l2(key)).entry
        except L2Unavailable:
            return self._fallback(key, l1_missed=l1_missed)
        self._count_l2(entry, l1_missed)
        return entry

    def _count_l2(self, entry: CacheEntry | None, l1_missed: bool) -> None:
        self.counters.lookup(
            l1_missed=l1_missed,
            l2="miss" if entry is None else "hit",
            negative=entry is not None and entry.value is None,
        )

    def _fallback(self, key: str, *, l1_missed: bool) -> CacheEntry | None:
        """Redis failed: L1 is all there is (if it was bypassed, read it now)."""
        entry = None
        if self.l1 is not None and not l1_missed:
            entry = self.l1.get(key)
            l1_missed = entry is None
        self.counters.lookup(
            l1_missed=l1_missed,
            l2="error",
            hit_l1=entry is not None,
            negative=entry is not None and entry.value is None,
        )
        return entry

    def _fetch_l2(self, key: str) -> _Seen:
        """Read ``key`` from Redis, filling L1 if it is trusted. Raises L2Unavailable."""
        assert self.l2 is not None
        token = self._begin_fill(key)
        try:
            raw = self.l2.get(key)
        except L2Unavailable:
            self._end_fill(key, token, None)
            raise
        return self._seen(key, token, raw)

    async def _afetch_l2(self, key: str) -> _Seen:
        assert self.l2 is not None
        token = self._begin_fill(key)
        try:
            raw = await self.l2.aget(key)
        except L2Unavailable:
            self._end_fill(key, token, None)
            raise
        return self._seen(key, token, raw)

    def _seen(self, key: str, token: object | None, raw: bytes | None) -> _Seen:
        entry = self._decode_entry(raw)
        self._end_fill(key, token, entry)
        return _Seen(entry, raw)

    def _begin_fill(self, key: str) -> object | None:
        return self.l1.begin_fill(key) if self.l1 is not None and self._coherent else None

    def _end_fill(self, key: str, token: object | None, entry: CacheEntry | None) -> None:
        if token is None or self.l1 is None:
            return
        if entry is not None and entry.expires_at <= self.l1.clock():
            entry = None
        self.l1.finish_fill(key, token, entry)

    def _decode_entry(self, raw: bytes | None) -> CacheEntry | None:
        if raw is None or Codec.is_tombstone(raw):
            return None
        try:
            envelope = self._codec.decode(raw)
        except CacheSerializationError as e:
            if self.l2 is not None:
                self.l2.count_error()
            if not self._warned_decode:
                self._warned_decode = True
                logger.warning("cache %r: %s; treating such entries as misses", self.name, e)
            return None
        return self._entry(envelope)

    def _entry(self, envelope: Envelope, tags: tuple[str, ...] = ()) -> CacheEntry:
        remaining_s = envelope.written_at + envelope.ttl_s - self.clock()
        l1_ttl_s = min(envelope.l1_ttl_s, remaining_s)
        now = self.l1.clock() if self.l1 is not None else time.monotonic()
        return CacheEntry(envelope.value, now + l1_ttl_s, envelope.written_at, envelope.ttl_s, tags)

    # --- writes ---------------------------------------------------------------------------------
    def _write_plan(
        self, value: Any, ttl_s: float | None, l1_ttl_s: float | None, tags: Sequence[str]
    ) -> _Plan:
        negative_ttl_s = ttl_s if value is None else None
        return _Plan(ttl_s, l1_ttl_s, tuple(tags), negative_ttl_s, False)

    def _plan(
        self,
        ttl_s: float | None,
        l1_ttl_s: float | None,
        tags: Sequence[str],
        negative_ttl_s: float | None,
        lock: bool | None,
    ) -> _Plan:
        return _Plan(
            ttl_s, l1_ttl_s, tuple(tags), negative_ttl_s, self.lock if lock is None else lock
        )

    def _ttl_for(self, value: Any, plan: _Plan) -> float:
        if value is None:
            return self.negative_ttl_s if plan.negative_ttl_s is None else plan.negative_ttl_s
        return self.default_ttl_s if plan.ttl_s is None else plan.ttl_s

    def _prepare(self, key: str, value: Any, plan: _Plan) -> tuple[StoredItem, CacheEntry]:
        """Encode once for Redis; L1 keeps the decoded copy, so every level returns equal values
        (a tuple comes back as a list everywhere) and later mutation of ``value`` is harmless."""
        ttl_s = self._ttl_for(value, plan)
        if ttl_s <= 0:
            raise CacheConfigError(f"ttl_s must be > 0, got {ttl_s}")
        l1_ttl_s = ttl_s if plan.l1_ttl_s is None else min(plan.l1_ttl_s, ttl_s)
        raw = self._codec.encode(value, written_at=self.clock(), ttl_s=ttl_s, l1_ttl_s=l1_ttl_s)
        entry = self._entry(self._codec.decode(raw), plan.tags)
        return StoredItem(key, raw, _ms(ttl_s), plan.tags), entry

    def _tombstone(self) -> dict[str, Any]:
        return {
            "tombstone": Codec.tombstone(written_at=self.clock()),
            "ttl_ms": _ms(self.lock_ttl_s),
        }

    def _l2_set(self, item: StoredItem) -> bool | None:
        """Explicit write: True if Redis has it (or there is no Redis), None if unreachable."""
        if self.l2 is None:
            return True
        try:
            self.l2.set(item, notice=encode_notice(self._sender, [item.key]))
        except L2Unavailable:
            self._pending.add(keys=[item.key])
            return None
        return True

    async def _al2_set(self, item: StoredItem) -> bool | None:
        if self.l2 is None:
            return True
        try:
            await self.l2.aset(item, notice=encode_notice(self._sender, [item.key]))
        except L2Unavailable:
            self._pending.add(keys=[item.key])
            return None
        return True

    def _begin_write(self, key: str) -> object | None:
        return self.l1.begin_write(key) if self.l1 is not None else None

    def _finish_write(
        self, key: str, token: object | None, entry: CacheEntry | None, stored: bool | None
    ) -> None:
        """After writing to Redis (True stored, False not, None unreachable): keep ``entry`` in
        L1 if L1 is trusted and nothing overlapped; while Redis is unreachable keep it as
        suspect; otherwise make sure L1 holds no older copy."""
        if token is None or self.l1 is None:
            return
        if stored is None and entry is not None:
            entry.suspect = True
        elif not (stored and self._coherent):
            entry = None
        self.l1.finish_write(key, token, entry)

    def _l1_delete_tag(self, tag: str, keys: list[str]) -> int:
        if self.l1 is None:
            return len(keys)
        self.l1.delete_many(keys)
        return len(set(keys) | set(self.l1.delete_tag(tag)))

    def _warm_chunk(self, prepared: list[tuple[StoredItem, CacheEntry]]) -> int:
        if self.l2 is None:
            assert self.l1 is not None
            for item, entry in prepared:
                self.l1.set(item.key, entry)
            return len(prepared)
        keys = [item.key for item, _ in prepared]
        try:
            self.l2.set_many(
                [item for item, _ in prepared],
                notice=encode_notice(self._sender, keys),
                condition=UNLESS_DELETED,
            )
        except L2Unavailable:
            return 0
        if self.l1 is not None:
            self.l1.delete_many(keys)
        return len(prepared)

    # --- loading --------------------------------------------------------------------------------
    # A load is fenced: L2 is read (``_Seen``) before the loader starts, and its result is
    # stored only if L2 still holds exactly that (compare-and-set), and kept in L1 only if no
    # write or invalidation of the key overlapped it here (write token). A delete during the
    # load leaves a tombstone, so the slower, older read never overwrites the newer state.

    def _refresh_due(self, entry: CacheEntry, override: float | None) -> bool:
        ratio = self.early_refresh if override is None else override
        return ratio is not None and entry.refresh_due(ratio, self.clock())

    def _load(self, key: str, loader: Callable[[], T], plan: _Plan) -> T:
        entry = self._recheck_l1(key)
        if entry is not None:
            return cast(T, entry.value)
        if plan.lock and self.l2 is not None and self.l2.available:
            return self._load_locked(key, loader, plan)
        seen = self._observe(key)
        if seen.entry is not None:
            return cast(T, seen.entry.value)
        return self._load_and_store(key, loader, plan, seen)

    def _recheck_l1(self, key: str) -> CacheEntry | None:
        """Inside the flight: did the flight that just ended store it? (Not counted.)"""
        if self.l1 is not None and self._l1_readable():
            return self.l1.get(key)
        return None

    def _observe(self, key: str) -> _Seen:
        if self.l2 is None:
            return _UNSEEN
        try:
            return self._fetch_l2(key)
        except L2Unavailable:
            return _UNSEEN

    def _load_and_store(self, key: str, loader: Callable[[], T], plan: _Plan, seen: _Seen) -> T:
        token = self._begin_write(key)
        entry: CacheEntry | None = None
        stored: bool | None = False
        try:
            start = time.perf_counter()
            try:
                value = loader()
            finally:
                self.counters.load(time.perf_counter() - start)
            if value is not None or self._ttl_for(None, plan) > 0:  # else: negative caching off
                item, entry = self._prepare(key, value, plan)
                stored = self._l2_store(item, seen)
            return value
        finally:
            self._finish_write(key, token, entry, stored)

    def _l2_store(self, item: StoredItem, seen: _Seen) -> bool | None:
        """Compare-and-set after a load: True stored, False fenced off, None unreachable."""
        if self.l2 is None:
            return True
        try:
            return self.l2.store(
                item, condition=seen.raw or b"", notice=encode_notice(self._sender, [item.key])
            )
        except L2Unavailable:
            return None

    async def _al2_store(self, item: StoredItem, seen: _Seen) -> bool | None:
        if self.l2 is None:
            return True
        try:
            return await self.l2.astore(
                item, condition=seen.raw or b"", notice=encode_notice(self._sender, [item.key])
            )
        except L2Unavailable:
            return None

    def _load_locked(self, key: str, loader: Callable[[], T], plan: _Plan) -> T:
        """Load under the Redis lock, or wait for the process holding it to store the value."""
        assert self.l2 is not None
        deadline = time.monotonic() + self.lock_ttl_s
        delay_s = LOCK_POLL_MIN_S
        while True:
            try:
                token = self.l2.try_lock(key, _ms(self.lock_ttl_s))
            except L2Unavailable:
                return self._load_and_store(key, loader, plan, _UNSEEN)
            seen = self._observe(key)  # holder: what must still be there when we store
            if seen.entry is not None or token is not None:
                return self._load_holding(key, token, loader, plan, seen)
            if time.monotonic() >= deadline:  # the holder is stuck or gone: stop waiting
                return self._load_and_store(key, loader, plan, seen)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, LOCK_POLL_MAX_S)

    def _load_holding(
        self, key: str, token: str | None, loader: Callable[[], T], plan: _Plan, seen: _Seen
    ) -> T:
        assert self.l2 is not None
        try:
            if seen.entry is not None:
                return cast(T, seen.entry.value)
            return self._load_and_store(key, loader, plan, seen)
        finally:
            if token is not None:
                self.l2.unlock(key, token)

    def _refresh(self, key: str, entry: CacheEntry, loader: Callable[[], T], plan: _Plan) -> T:
        """Early refresh: one caller reloads; everyone else gets the current value meanwhile."""
        ran, value = self._flights.do_if_idle(
            key, lambda: self._refresh_now(key, entry, loader, plan)
        )
        return cast(T, value if ran else entry.value)

    def _refresh_now(self, key: str, entry: CacheEntry, loader: Callable[[], T], plan: _Plan) -> T:
        token = None
        if plan.lock and self.l2 is not None:
            try:
                token = self.l2.try_lock(key, _ms(self.lock_ttl_s))
            except L2Unavailable:
                token = None
            if token is None:  # another process is refreshing it
                return cast(T, entry.value)
        try:
            return self._load_and_store(key, loader, plan, self._observe(key))
        except Exception:
            logger.warning(
                "cache %r: early refresh of %r failed; serving the current value",
                self.name,
                key,
                exc_info=True,
            )
            return cast(T, entry.value)
        finally:
            if token is not None and self.l2 is not None:
                self.l2.unlock(key, token)

    # --- loading, asyncio -------------------------------------------------------------------------
    async def _aload(self, key: str, loader: Callable[[], Awaitable[T]], plan: _Plan) -> T:
        entry = self._recheck_l1(key)
        if entry is not None:
            return cast(T, entry.value)
        if plan.lock and self.l2 is not None and self.l2.available:
            return await self._aload_locked(key, loader, plan)
        seen = await self._aobserve(key)
        if seen.entry is not None:
            return cast(T, seen.entry.value)
        return await self._aload_and_store(key, loader, plan, seen)

    async def _aobserve(self, key: str) -> _Seen:
        if self.l2 is None:
            return _UNSEEN
        try:
            return await self._afetch_l2(key)
        except L2Unavailable:
            return _UNSEEN

    async def _aload_and_store(
        self, key: str, loader: Callable[[], Awaitable[T]], plan: _Plan, seen: _Seen
    ) -> T:
        token = self._begin_write(key)
        entry: CacheEntry | None = None
        stored: bool | None = False
        try:
            start = time.perf_counter()
            try:
                value = await loader()
            finally:
                self.counters.load(time.perf_counter() - start)
            if value is not None or self._ttl_for(None, plan) > 0:
                item, entry = self._prepare(key, value, plan)
                stored = await self._al2_store(item, seen)
            return value
        finally:
            self._finish_write(key, token, entry, stored)

    async def _aload_locked(self, key: str, loader: Callable[[], Awaitable[T]], plan: _Plan) -> T:
        assert self.l2 is not None
        deadline = time.monotonic() + self.lock_ttl_s
        delay_s = LOCK_POLL_MIN_S
        while True:
            try:
                token = await self.l2.atry_lock(key, _ms(self.lock_ttl_s))
            except L2Unavailable:
                return await self._aload_and_store(key, loader, plan, _UNSEEN)
            seen = await self._aobserve(key)
            if seen.entry is not None or token is not None:
                return await self._aload_holding(key, token, loader, plan, seen)
            if time.monotonic() >= deadline:
                return await self._aload_and_store(key, loader, plan, seen)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, LOCK_POLL_MAX_S)

    async def _aload_holding(
        self,
        key: str,
        token: str | None,
        loader: Callable[[], Awaitable[T]],
        plan: _Plan,
        seen: _Seen,
    ) -> T:
        assert self.l2 is not None
        try:
            if seen.entry is not None:
                return cast(T, seen.entry.value)
            return await self._aload_and_store(key, loader, plan, seen)
        finally:
            if token is not None:
                await self.l2.aunlock(key, token)

    async def _arefresh(
        self, key: str, entry: CacheEntry, loader: Callable[[], Awaitable[T]], plan: _Plan
    ) -> T:
        ran, value = await self._aflights.do_if_idle(
            key, lambda: self._arefresh_now(key, entry, loader, plan)
        )
        return cast(T, value if ran else entry.value)

    async def _arefresh_now(
        self, key: str, entry: CacheEntry, loader: Callable[[], Awaitable[T]], plan: _Plan
    ) -> T:
        token = None
        if plan.lock and self.l2 is not None:
            try:
                token = await self.l2.atry_lock(key, _ms(self.lock_ttl_s))
            except L2Unavailable:
                token = None
            if token is None:
                return cast(T, entry.value)
        try:
            return await self._aload_and_store(key, loader, plan, await self._aobserve(key))
        except Exception:
            logger.warning(
                "cache %r: early refresh of %r failed; serving the current value",
                self.name,
                key,
                exc_info=True,
            )
            return cast(T, entry.value)
        finally:
            if token is not None and self.l2 is not None:
                await self.l2.aunlock(key, token)

    # --- coherence and recovery ---------------------------------------------------------------
    def _start_listener(self) -> None:
        with self._listener_lock:
            if self._closed or self._listener is not None:
                return
            self._listener = InvalidationListener(
                self._redis_url,
                cache=self.name,
                sender=self._sender,
                on_notice=self._on_notice,
                on_connected=self._on_connected,
                on_lost=self._on_lost,
            )
            self._listener.start()

    def _on_notice(self, notice: Notice) -> None:
        self.counters.invalidation()
        if self.l1 is None:
            return
        if notice.keys is None:
            self.l1.clear()
        else:
            self.l1.delete_many(notice.keys)

    def _on_connected(self, reconnected: bool) -> None:
        if reconnected:
            logger.warning("cache %r: invalidation channel is back; L1 in use again", self.name)
        if self.l2 is not None:
            self.l2.mark_reachable()  # the SUBSCRIBE just answered: close an open circuit
        self._replay_pending()
        if self.l1 is not None:
            self.l1.clear()  # anything in it was stored while notices could be missed
        self._coherent = True
        self._coherent_event.set()

    def _on_lost(self, error: BaseException) -> None:
        if self._closed:
            return
        was_coherent, self._coherent = self._coherent, False
        self._coherent_event.clear()
        # Only a trusted L1 holds entries that missed notices could make stale; before the
        # first subscription it holds at most suspect entries, dropped when Redis is back.
        dropped = self.l1.clear() if self.l1 is not None and was_coherent else 0
        logger.warning(
            "cache %r: invalidation channel down (%s); cleared %d L1 entries, L1 is "
            "bypassed until it reconnects",
            self.name,
            error,
            dropped,
        )

    def _l2_recovered(self) -> None:
        """First Redis success after failures: drop suspect L1 entries, replay failed writes."""
        if self.l1 is not None:
            self.l1.drop_suspect()
        self._replay_pending()

    def _replay_pending(self) -> None:
        if self.l2 is None or not len(self._pending):
            return
        keys, tags, everything = self._pending.take()
        try:
            if everything:
                self.l2.clear(notice=encode_clear(self._sender))
            elif keys:
                ordered = sorted(keys)
                self.l2.delete(
                    ordered, notice=encode_notice(self._sender, ordered), **self._tombstone()
                )
            for tag in () if everything else tags:
                self.l2.delete_tag(tag, sender=self._sender, **self._tombstone())
        except L2Unavailable:
            self._pending.add(keys, tags, everything)
            return
        logger.info(
            "cache %r: replayed %s failed writes as deletes",
            self.name,
            "all" if everything else len(keys) + len(tags),
        )

    def _reset_after_fork(self) -> None:
        if self.l1 is not None:
            self.l1 = MemoryBackend(max_entries=self.l1.max_entries, name=self.name)
        if self.l2 is not None:
            self.l2.reset_after_fork()
        self.counters.reset_after_fork()
        # No thread may start inside a fork handler: the listener starts on first use.
        self._init_process_state(start_listener=False)


def _resolve_mode(mode: Mode | None, redis_url: str | None, l1_max_entries: int) -> Mode:
    if mode is None:
        mode = "l1" if not redis_url else "l2" if l1_max_entries == 0 else "tiered"
    if mode not in ("tiered", "l1", "l2"):
        raise CacheConfigError(f"unknown cache mode {mode!r}; expected tiered, l1 or l2")
    if mode != "l1" and not redis_url:
        raise CacheConfigError(f"cache mode {mode!r} needs redis_url")
    if mode != "l2" and l1_max_entries < 1:
        raise CacheConfigError(f"cache mode {mode!r} needs cache_l1_max_entries >= 1")
    return mode


def _check_options(
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


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _chunks(items: Iterable[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _reset_in_forked_children(cache: TieredCache) -> None:
    """A forked child (Celery prefork, gunicorn --preload) gets its own L1, identity and
    listener; without this it would inherit an L1 nobody keeps coherent."""
    ref = weakref.ref(cache)

    def reset() -> None:
        instance = ref()
        if instance is not None:
            instance._reset_after_fork()

    os.register_at_fork(after_in_child=reset)


__all__ = ["Mode", "TieredCache"]
