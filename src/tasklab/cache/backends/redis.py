"""L2: Redis, shared by every process, behind a circuit breaker.

Public methods either return Redis's answer or raise :class:`L2Unavailable`; they never raise a
redis-py error. Connection failures feed the breaker; while it is open, calls are refused without
touching the network. The breaker's transitions are logged once each (WARNING) and exported as
``tasklab_cache_redis_available``.

Writes carry their invalidation notice: the value and the PUBLISH go out in one round trip
(a pipeline, or a Lua script when tags or a condition are involved, which keeps them atomic).
Deletes leave a short-lived tombstone instead of nothing, so a loader that read the database
before the delete cannot store its stale result after it (its store is a compare-and-set
against what it saw).
redis-py's own retries are off: the breaker decides when to try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasklab.cache import constants
from tasklab.cache.breaker import CircuitBreaker
from tasklab.cache.errors import L2Unavailable
from tasklab.observe.metrics import CACHE_ERRORS, CACHE_REDIS_AVAILABLE
from tasklab.settings import mask_url

logger = logging.getLogger("tasklab.cache")
T = TypeVar("T")

# KEYS[1] value key, KEYS[2..] tag sets. ARGV: condition, payload, ttl_ms, member, channel,
# notice. Condition: '*' always; '!t' unless a tombstone is there (a delete raced us); '<T'
# unless a tombstone is there or the value there was written at or after T (epoch seconds,
# the header's written_at: a newer value); any other string: only if the current value is
# exactly that ('' = absent) - compare-and-set.
STORE_LUA = """
local cond = ARGV[1]
if cond ~= '*' then
  local cur = redis.call('GET', KEYS[1])
  if cond == '!t' then
    if cur and string.sub(cur, 1, 1) == 't' then return 0 end
  elseif string.sub(cond, 1, 1) == '<' then
    if cur and (string.sub(cur, 1, 1) == 't'
        or struct.unpack('>d', string.sub(cur, 2, 9)) >= tonumber(string.sub(cond, 2))) then
      return 0
    end
  elseif (cur or '') ~= cond then
    return 0
  end
end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[4])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
"""
ALWAYS = "*"
UNLESS_DELETED = "!t"


def written_before(at: float) -> str:
    """The condition of a store that must not replace a value or a delete newer than ``at``."""
    return f"<{at!r}"


# Error prefixes Redis answers with while it cannot serve writes (not a bad command).
SERVER_STATE_ERRORS = frozenset(
    {"READONLY", "OOM", "LOADING", "MASTERDOWN", "MISCONF", "NOREPLICAS", "BUSY", "CLUSTERDOWN"}
)

# KEYS[1] tag set; ARGV: value key prefix, channel, sender, tombstone, tombstone ttl_ms.
# Every member becomes a tombstone; returns the cache keys.
DELETE_TAG_LUA = """
local members = redis.call('SMEMBERS', KEYS[1])
for i = 1, #members do redis.call('SET', ARGV[1] .. members[i], ARGV[4], 'PX', ARGV[5]) end
redis.call('DEL', KEYS[1])
if #members > 0 then
  redis.call('PUBLISH', ARGV[2], cjson.encode({s = ARGV[3], k = members}))
end
return members
"""

UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

CLEAR_SCAN_COUNT = 1000


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One value to write: its cache key, encoded bytes, TTL and tags."""

    key: str
    raw: bytes
    ttl_ms: int
    tags: tuple[str, ...] = ()


@dataclass
class _AsyncConn:
    client: aioredis.Redis
    store: Any
    delete_tag: Any
    unlock: Any


class RedisBackend:
    """One cache's view of Redis: sync and asyncio clients sharing one breaker."""

    def __init__(
        self,
        url: str,
        *,
        cache: str,
        timeout_s: float = 0.25,
        failure_threshold: int = 3,
        reset_s: float = 2.0,
    ) -> None:
        self.url = url
        self.cache = cache
        self.timeout_s = timeout_s
        self.errors = 0
        self.on_recovered: Callable[[], None] | None = None
        self.breaker = CircuitBreaker(
            failure_threshold=failure_threshold,
            reset_s=reset_s,
            on_open=self._opened,
            on_recover=self._recovered,
        )
        self._client = redis.Redis.from_url(url, **self._client_options(Retry(NoBackoff(), 0)))
        self._store = self._client.register_script(STORE_LUA)
        self._delete_tag = self._client.register_script(DELETE_TAG_LUA)
        self._unlock = self._client.register_script(UNLOCK_LUA)
        self._aconns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncConn] = (
            weakref.WeakKeyDictionary()
        )
        self._prefix = constants.value_prefix(cache)
        self._channel = constants.channel(cache)
        self._errors_metric = CACHE_ERRORS.labels(cache=cache, level="l2")
        self._available_metric = CACHE_REDIS_AVAILABLE.labels(cache=cache)
        self._available_metric.set(1)

    @property
    def available(self) -> bool:
        """False while the circuit is open (calls would be refused)."""
        return self.breaker.available

    def _client_options(self, retry: Any) -> dict[str, Any]:
        return {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            "retry": retry,
            "client_name": f"tasklab-cache:{self.cache}",
        }

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _tag_keys(self, tags: Sequence[str]) -> list[str]:
        return [constants.tag_key(self.cache, t) for t in tags]

    # --- sync operations ----------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        return cast("bytes | None", self._call(lambda c: c.get(self._key(key))))

    def set(self, item: StoredItem, *, notice: bytes) -> None:
        """Write unconditionally (an explicit ``set`` wins) and publish ``notice``."""
        self.set_many([item], notice=notice)

    def store(self, item: StoredItem, *, condition: bytes | str, notice: bytes) -> bool:
        """Write if ``condition`` holds (see STORE_LUA); False if it did not."""
        return bool(
            self._call(
                lambda c: self._store(
                    keys=self._store_keys(item), args=self._store_args(item, condition, notice)
                )
            )
        )

    def set_many(
        self, items: Sequence[StoredItem], *, notice: bytes, condition: str = ALWAYS
    ) -> None:
        """Write ``items`` and publish ``notice``, all in one round trip."""

        def op(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for item in items:
                if item.tags or condition != ALWAYS:
                    self._store(
                        keys=self._store_keys(item),
                        args=self._store_args(item, condition, b""),
                        client=pipe,
                    )
                else:
                    pipe.set(self._key(item.key), item.raw, px=item.ttl_ms)
            pipe.publish(self._channel, notice)
            pipe.execute()

        self._call(op)

    def _store_keys(self, item: StoredItem) -> list[str]:
        return [self._key(item.key), *self._tag_keys(item.tags)]

    def _store_args(self, item: StoredItem, condition: bytes | str, notice: bytes) -> list[Any]:
        return [condition, item.raw, item.ttl_ms, item.key, self._channel, notice]

    def delete(self, keys: Sequence[str], *, tombstone: bytes, ttl_ms: int, notice: bytes) -> None:
        """Replace ``keys`` by a short-lived tombstone and publish ``notice``."""

        def op(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.set(self._key(key), tombstone, px=ttl_ms)
            pipe.publish(self._channel, notice)
            pipe.execute()

        self._call(op)

    def delete_tag(self, tag: str, *, sender: str, tombstone: bytes, ttl_ms: int) -> list[str]:
        """Delete every key stored with ``tag``; the script publishes the notice. Returns keys."""
        members = self._call(
            lambda c: self._delete_tag(
                keys=[constants.tag_key(self.cache, tag)],
                args=[self._prefix, self._channel, sender, tombstone, ttl_ms],
            )
        )
        return [m.decode() for m in cast("list[bytes]", members)]

    def try_lock(self, key: str, ttl_ms: int) -> str | None:
        """Take the loader lock of ``key``; its token, or None if another process holds it."""
        token = uuid.uuid4().hex
        ok = self._call(
            lambda c: c.set(constants.lock_key(self.cache, key), token, nx=True, px=ttl_ms)
        )
        return token if ok else None

    def unlock(self, key: str, token: str) -> None:
        """Release the lock if we still hold it (never raises: it expires anyway)."""
        with contextlib.suppress(L2Unavailable):
            self._call(
                lambda c: self._unlock(keys=[constants.lock_key(self.cache, key)], args=[token])
            )

    def clear(self, *, notice: bytes) -> int:
        """Remove every key of this cache (SCAN + UNLINK), then publish ``notice``."""

        def op(client: redis.Redis) -> int:
            removed = 0
            batch: list[Any] = []
            for name in client.scan_iter(
                match=constants.namespace(self.cache) + "*", count=CLEAR_SCAN_COUNT
            ):
                batch.append(name)
                if len(batch) >= CLEAR_SCAN_COUNT:
                    removed += client.unlink(*batch)
                    batch.clear()
            if batch:
                removed += client.unlink(*batch)
            client.publish(self._channel, notice)
            return removed

        return self._call(op)

    def _call(self, op: Callable[[redis.Redis], T]) -> T:
        if not self.breaker.allow():
            raise L2Unavailable("circuit open")
        try:
            result = op(self._client)
        except redis.ResponseError as e:
            self._refused(e)
            raise L2Unavailable(f"Redis refused a command: {e}") from e
        except (redis.RedisError, OSError) as e:
            self._count_error()
            self.breaker.record_failure()
            raise L2Unavailable(f"Redis unreachable: {e}") from e
        self.breaker.record_success()
        return result

    def _refused(self, error: redis.ResponseError) -> None:
        """A refusal by the server's state (READONLY after a failover, OOM, LOADING...) is an
        outage like a dropped connection: it trips the breaker, so L1 entries turn suspect and
        failed deletes are replayed once Redis takes writes again. Any other refusal is a bug
        or bad data and leaves the breaker alone."""
        self._count_error()
        if _server_state_error(error):
            self.breaker.record_failure()

    # --- asyncio operations -------------------------------------------------------------------
    def _aconn(self) -> _AsyncConn:
        loop = asyncio.get_running_loop()
        conn = self._aconns.get(loop)
        if conn is None:
            client = aioredis.Redis.from_url(
                self.url, **self._client_options(AsyncRetry(NoBackoff(), 0))
            )
            conn = _AsyncConn(
                client,
                client.register_script(STORE_LUA),
                client.register_script(DELETE_TAG_LUA),
                client.register_script(UNLOCK_LUA),
            )
            self._aconns[loop] = conn
        return conn

    async def aget(self, key: str) -> bytes | None:
        return cast("bytes | None", await self._acall(lambda c: c.client.get(self._key(key))))

    async def aset(self, item: StoredItem, *, notice: bytes) -> None:
        async def op(conn: _AsyncConn) -> None:
            pipe = conn.client.pipeline(transaction=False)
            if item.tags:
                await conn.store(
                    keys=self._store_keys(item),
                    args=self._store_args(item, ALWAYS, b""),
                    client=pipe,
                )
            else:
                pipe.set(self._key(item.key), item.raw, px=item.ttl_ms)
            pipe.publish(self._channel, notice)
            await pipe.execute()

        await self._acall(op)

    async def astore(self, item: StoredItem, *, condition: bytes | str, notice: bytes) -> bool:
        return bool(
            await self._acall(
                lambda c: c.store(
                    keys=self._store_keys(item), args=self._store_args(item, condition, notice)
                )
            )
        )

    async def adelete(
        self, keys: Sequence[str], *, tombstone: bytes, ttl_ms: int, notice: bytes
    ) -> None:
        async def op(conn: _AsyncConn) -> None:
            pipe = conn.client.pipeline(transaction=False)
            for key in keys:
                pipe.set(self._key(key), tombstone, px=ttl_ms)
            pipe.publish(self._channel, notice)
            await pipe.execute()

        await self._acall(op)

    async def adelete_tag(
        self, tag: str, *, sender: str, tombstone: bytes, ttl_ms: int
    ) -> list[str]:
        members = await self._acall(
            lambda c: c.delete_tag(
                keys=[constants.tag_key(self.cache, tag)],
                args=[self._prefix, self._channel, sender, tombstone, ttl_ms],
            )
        )
        return [m.decode() for m in cast("list[bytes]", members)]

    async def atry_lock(self, key: str, ttl_ms: int) -> str | None:
        token = uuid.uuid4().hex
        ok = await self._acall(
            lambda c: c.client.set(constants.lock_key(self.cache, key), token, nx=True, px=ttl_ms)
        )
        return token if ok else None

    async def aunlock(self, key: str, token: str) -> None:
        with contextlib.suppress(L2Unavailable):
            await self._acall(
                lambda c: c.unlock(keys=[constants.lock_key(self.cache, key)], args=[token])
            )

    async def _acall(self, op: Callable[[_AsyncConn], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise L2Unavailable("circuit open")
        try:
            result = await op(self._aconn())
        except redis.ResponseError as e:
            self._refused(e)
            raise L2Unavailable(f"Redis refused a command: {e}") from e
        except (redis.RedisError, OSError) as e:
            self._count_error()
            self.breaker.record_failure()
            raise L2Unavailable(f"Redis unreachable: {e}") from e
        self.breaker.record_success()
        return result

    # --- breaker hooks, lifecycle -----------------------------------------------------------
    def mark_reachable(self) -> None:
        """Another connection to this Redis just succeeded (the invalidation listener)."""
        self.breaker.record_success()

    def count_error(self) -> None:
        """Count an L2 problem found above this layer (e.g. an undecodable payload)."""
        self._count_error()

    def _count_error(self) -> None:
        self.errors += 1
        self._errors_metric.inc()

    def _opened(self) -> None:
        self._available_metric.set(0)
        logger.warning(
            "cache %r: Redis at %s is unreachable; serving from L1 and the loader, "
            "retrying every %.1fs",
            self.cache,
            mask_url(self.url),
            self.breaker.reset_s,
        )

    def _recovered(self, was_open: bool) -> None:
        if was_open:
            self._available_metric.set(1)
            down_s = self.breaker.clock() - self.breaker.opened_at
            logger.warning(
                "cache %r: Redis at %s answers again after %.1fs; dropping L1 "
                "entries written meanwhile",
                self.cache,
                mask_url(self.url),
                down_s,
            )
        if self.on_recovered is not None:
            self.on_recovered()

    def reset_after_fork(self) -> None:
        """In a forked child: fresh locks, no event-loop-bound clients (redis-py resets pools)."""
        self.breaker.reset_after_fork()
        self._aconns = weakref.WeakKeyDictionary()

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        """Close the asyncio client of the running loop, then the sync one."""
        conn = self._aconns.pop(asyncio.get_running_loop(), None)
        if conn is not None:
            await conn.client.aclose()
        self.close()


def _server_state_error(error: redis.ResponseError) -> bool:
    # redis-py strips the code of the errors it maps (ReadOnlyError, OutOfMemoryError); from
    # inside a script the code follows the script's own prefix.
    if isinstance(error, (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)):
        return True
    code = getattr(error, "status_code", None)
    words = {str(code).upper()} | {w.lstrip("-") for w in str(error).split()}
    return bool(words & SERVER_STATE_ERRORS)


__all__ = ["ALWAYS", "UNLESS_DELETED", "RedisBackend", "StoredItem", "written_before"]
