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

The class keeps the public API, lookups and writes; fenced loads live in ``loading``, the
invalidation channel and recovery in ``coherence``, the small records in ``plans``.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from tasklab.cache import coherence, loading
from tasklab.cache.backends.memory import CacheEntry, MemoryBackend
from tasklab.cache.backends.redis import RedisBackend, StoredItem, written_before
from tasklab.cache.errors import CacheConfigError, CacheSerializationError, L2Unavailable
from tasklab.cache.invalidation import InvalidationListener, encode_clear, encode_notice
from tasklab.cache.plans import (
    Mode,
    PendingWrites,
    Plan,
    Seen,
    check_options,
    chunks,
    ms,
    resolve_mode,
)
from tasklab.cache.serialization import Codec, Envelope, Serializer, serializer_for
from tasklab.cache.singleflight import AsyncSingleFlight, SingleFlight
from tasklab.cache.stats import CacheCounters
from tasklab.settings import Settings

logger = logging.getLogger("tasklab.cache")
T = TypeVar("T")

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # part of Redis keys and client names
WARM_BATCH = 500  # keys per pipeline in warm()


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
        self.mode: Mode = resolve_mode(mode, settings.redis_url, l1_max)
        self.default_ttl_s = settings.cache_default_ttl_s if ttl_s is None else ttl_s
        check_options(self.default_ttl_s, negative_ttl_s, lock_ttl_s, early_refresh)
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
            self.l2.on_recovered = functools.partial(coherence.l2_recovered, self)
        self._closed = False
        self._warned_decode = False
        self._init_process_state(start_listener=True)
        coherence.reset_in_forked_children(self)

    def _init_process_state(self, *, start_listener: bool) -> None:
        """State a forked child must not share: identity, locks, flights, the listener."""
        self._sender = uuid.uuid4().hex[:16]
        self._flights = SingleFlight()
        self._aflights = AsyncSingleFlight()
        self._pending = PendingWrites()
        self._listener: InvalidationListener | None = None
        self._listener_lock = threading.Lock()
        self._coherent = self.mode == "l1"
        self._coherent_event = threading.Event()
        if self._coherent:
            self._coherent_event.set()
        if start_listener and self.mode == "tiered":
            coherence.start_listener(self)

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
        if entry is not None and not loading.refresh_due(self, entry, early_refresh):
            return cast(T, entry.value)
        plan = self._plan(ttl_s, l1_ttl_s, tags, negative_ttl_s, lock)
        if entry is not None:
            return loading.refresh(self, key, entry, loader, plan)
        return self._flights.do(key, lambda: loading.load(self, key, loader, plan))

    def warm(
        self,
        items: Iterable[tuple[str, Any]],
        *,
        ttl_s: float | None = None,
        l1_ttl_s: float | None = None,
        tags: Sequence[str] = (),
        read_at: float | None = None,
    ) -> int:
        """Store ``(key, value)`` pairs in Redis (batched) for every process to read.

        Other processes' L1 copies of these keys are invalidated; this process's L1 is not
        filled (warming a large set must not push the hot set out). ``read_at`` is when the
        values were read (default: now, which suits a lazy iterable): a key deleted since
        (tombstone present), or stored since by anyone, keeps what it has. In ``l1`` mode the
        values go to L1. Returns how many values were sent (0 while Redis is unreachable).
        """
        condition = written_before(self.clock() if read_at is None else read_at)
        plan = self._plan(ttl_s, l1_ttl_s, tags, None, False)
        stored = 0
        for chunk in chunks(items, WARM_BATCH):
            stored += self._warm_chunk([self._prepare(k, v, plan) for k, v in chunk], condition)
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
        if entry is not None and not loading.refresh_due(self, entry, early_refresh):
            return cast(T, entry.value)
        plan = self._plan(ttl_s, l1_ttl_s, tags, negative_ttl_s, lock)
        if entry is not None:
            return await loading.arefresh(self, key, entry, loader, plan)
        return await self._aflights.do(key, lambda: loading.aload(self, key, loader, plan))

    # --- state, lifecycle -----------------------------------------------------------------------
    @property
    def coherent(self) -> bool:
        """True while L1 is trusted (always in ``l1`` mode, never in ``l2`` mode)."""
        return self._coherent

    def wait_coherent(self, timeout_s: float = 5.0) -> bool:
        """Wait until the invalidation subscription is up (L1 in use). False on timeout."""
        if self.mode == "tiered" and self._listener is None:
            coherence.start_listener(self)
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
            coherence.start_listener(self)
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

    def _fetch_l2(self, key: str) -> Seen:
        """Read ``key`` from Redis, filling L1 if it is trusted. Raises L2Unavailable."""
        assert self.l2 is not None
        token = self._begin_fill(key)
        try:
            raw = self.l2.get(key)
        except L2Unavailable:
            self._end_fill(key, token, None)
            raise
        return self._seen(key, token, raw)

    async def _afetch_l2(self, key: str) -> Seen:
        assert self.l2 is not None
        token = self._begin_fill(key)
        try:
            raw = await self.l2.aget(key)
        except L2Unavailable:
            self._end_fill(key, token, None)
            raise
        return self._seen(key, token, raw)

    def _seen(self, key: str, token: object | None, raw: bytes | None) -> Seen:
        entry = self._decode_entry(raw)
        self._end_fill(key, token, entry)
        return Seen(entry, raw)

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
    ) -> Plan:
        negative_ttl_s = ttl_s if value is None else None
        return Plan(ttl_s, l1_ttl_s, tuple(tags), negative_ttl_s, False)

    def _plan(
        self,
        ttl_s: float | None,
        l1_ttl_s: float | None,
        tags: Sequence[str],
        negative_ttl_s: float | None,
        lock: bool | None,
    ) -> Plan:
        return Plan(
            ttl_s, l1_ttl_s, tuple(tags), negative_ttl_s, self.lock if lock is None else lock
        )

    def _ttl_for(self, value: Any, plan: Plan) -> float:
        if value is None:
            return self.negative_ttl_s if plan.negative_ttl_s is None else plan.negative_ttl_s
        return self.default_ttl_s if plan.ttl_s is None else plan.ttl_s

    def _prepare(self, key: str, value: Any, plan: Plan) -> tuple[StoredItem, CacheEntry]:
        """Encode once for Redis; L1 keeps the decoded copy, so every level returns equal values
        (a tuple comes back as a list everywhere) and later mutation of ``value`` is harmless."""
        ttl_s = self._ttl_for(value, plan)
        if ttl_s <= 0:
            raise CacheConfigError(f"ttl_s must be > 0, got {ttl_s}")
        l1_ttl_s = ttl_s if plan.l1_ttl_s is None else min(plan.l1_ttl_s, ttl_s)
        raw = self._codec.encode(value, written_at=self.clock(), ttl_s=ttl_s, l1_ttl_s=l1_ttl_s)
        entry = self._entry(self._codec.decode(raw), plan.tags)
        return StoredItem(key, raw, ms(ttl_s), plan.tags), entry

    def _tombstone(self) -> dict[str, Any]:
        return {
            "tombstone": Codec.tombstone(written_at=self.clock()),
            "ttl_ms": ms(self.lock_ttl_s),
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

    def _warm_chunk(self, prepared: list[tuple[StoredItem, CacheEntry]], condition: str) -> int:
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
                condition=condition,
            )
        except L2Unavailable:
            return 0
        if self.l1 is not None:
            self.l1.delete_many(keys)
        return len(prepared)


__all__ = ["Mode", "TieredCache"]
