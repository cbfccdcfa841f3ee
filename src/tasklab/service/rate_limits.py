"""Abuse limits: requests per bearer token and per client address, and failed
authentications per address, in the ``limits`` library's fixed windows.

The counters live in Redis, shared by every API process, under the keys ``limits``' own
RedisStorage uses. A request's counters are hit in one round trip (``HIT_LUA``: ``limits``
hits one counter per call, and the API paid a round trip per counter). While Redis does not
answer, each process counts in its own memory (``limits``' MemoryStorage) and tries Redis again
after ``SHARED_RETRY_S``: the limits get looser by the number of processes, never switched off.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from tasklab.service.domain.errors import RateLimited
from tasklab.service.problems import rate_limited
from tasklab.settings import Settings

log = logging.getLogger("tasklab.service.limits")
KEY_PREFIX = "tasklab:rl"
SHARED_RETRY_S = 2.0
REDIS_TIMEOUT_S = 0.25  # a limit check must not hold a request longer than this
_WHAT = {"auth-failed": "failed authentications from this address"}

# KEYS: the counters in order; ARGV: each one's window (s) and limit. limits' incr_expire.lua
# per key (the window starts at a counter's first hit), stopping at the first counter over its
# limit (the ones after it are not counted, as when they were hit one by one); its PTTL comes
# back with it, for Retry-After without another round trip. Returns {0, 0} when all are within.
HIT_LUA = """
for i, key in ipairs(KEYS) do
    local count = redis.call("incrby", key, 1)
    if count == 1 then
        redis.call("expire", key, ARGV[2 * i - 1])
    end
    if count > tonumber(ARGV[2 * i]) then
        return {i, redis.call("pttl", key)}
    end
end
return {0, 0}
"""

Counter = tuple[RateLimitItem, str, str]
"""A limit, what it counts (``token``, ``address``, ``auth-failed``) and whose (digest, address)."""


@dataclass(frozen=True, slots=True)
class Limits:
    per_token: RateLimitItem
    per_address: RateLimitItem
    failed_auth_per_address: RateLimitItem

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            per_token=parse(settings.rate_limit_per_token),
            per_address=parse(settings.rate_limit_per_address),
            failed_auth_per_address=parse(settings.rate_limit_failed_auth_per_address),
        )


def redis_key(counter: Counter) -> str:
    """The key ``limits``' RedisStorage (``key_prefix=KEY_PREFIX``) would use."""
    item, kind, who = counter
    return f"{KEY_PREFIX}:{item.key_for(kind, who)}"


def token_key(token: str) -> str:
    """Tokens are counted by digest: the raw secret never reaches Redis."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class RateLimiter:
    def __init__(self, limits: Limits, *, redis_url: str | None) -> None:
        self.limits = limits
        self._redis = (
            aioredis.Redis.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
            if redis_url
            else None
        )
        self._hit_script = self._redis.register_script(HIT_LUA) if self._redis else None
        self._local = FixedWindowRateLimiter(MemoryStorage())
        self._shared_down_until = 0.0

    @classmethod
    def for_settings(cls, settings: Settings) -> RateLimiter | None:
        if not settings.rate_limits_enabled:
            return None
        return cls(Limits.from_settings(settings), redis_url=settings.redis_url)

    @property
    def shared(self) -> bool:
        """True while the counters are Redis's (False: this process counts on its own)."""
        return self._redis is not None and time.monotonic() >= self._shared_down_until

    async def check_request(self, *, token: str | None, address: str) -> None:
        """Count one request; raise RateLimited naming the limit it went over."""
        counters = [(self.limits.per_address, "address", address)]
        if token:
            counters.append((self.limits.per_token, "token", token_key(token)))
        refused = await self._hit(counters)
        if refused is not None:
            raise refused

    async def check_auth_allowed(self, address: str) -> None:
        """Refuse an address whose failed authentications used up their budget (no query)."""
        refused = await self._test((self.limits.failed_auth_per_address, "auth-failed", address))
        if refused is not None:
            raise refused

    async def note_failed_auth(self, address: str) -> None:
        await self._hit([(self.limits.failed_auth_per_address, "auth-failed", address)])

    async def _hit(self, counters: list[Counter]) -> RateLimited | None:
        """Count on each counter in order up to the first over its limit: its refusal."""
        if self.shared:
            try:
                return await self._hit_in_redis(counters)
            except RedisError as e:
                self._shared_failed(e)
        for item, kind, who in counters:
            if not await self._local.hit(item, kind, who):
                return await self._local_refusal((item, kind, who))
        return None

    async def _test(self, counter: Counter) -> RateLimited | None:
        """The refusal if ``counter`` has no hit left, without counting one."""
        if self.shared:
            try:
                return await self._test_in_redis(counter)
            except RedisError as e:
                self._shared_failed(e)
        if await self._local.test(*counter):
            return None
        return await self._local_refusal(counter)

    async def _hit_in_redis(self, counters: list[Counter]) -> RateLimited | None:
        assert self._hit_script is not None
        keys = [redis_key(counter) for counter in counters]
        args = [n for item, _, _ in counters for n in (item.get_expiry(), item.amount)]
        over, ttl_ms = await self._hit_script(keys=keys, args=args)
        return _refusal(counters[over - 1], ttl_ms / 1000) if over else None

    async def _test_in_redis(self, counter: Counter) -> RateLimited | None:
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)  # GET and PTTL in one round trip
        pipe.get(redis_key(counter))
        pipe.pttl(redis_key(counter))
        count, ttl_ms = await pipe.execute()
        return _refusal(counter, ttl_ms / 1000) if int(count or 0) >= counter[0].amount else None

    async def _local_refusal(self, counter: Counter) -> RateLimited:
        stats = await self._local.get_window_stats(*counter)
        return _refusal(counter, stats.reset_time - time.time())

    def _shared_failed(self, error: RedisError) -> None:
        log.warning(
            "rate limit counters unavailable in Redis (%s): counting in this process for %.0f s",
            type(error).__name__,
            SHARED_RETRY_S,
        )
        self._shared_down_until = time.monotonic() + SHARED_RETRY_S

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _refusal(counter: Counter, reset_in_s: float) -> RateLimited:
    item, kind, _ = counter
    retry_after_s = max(1, math.ceil(reset_in_s))
    what = _WHAT.get(kind, f"requests per {kind}")
    return RateLimited(f"too many {what}: the limit is {item}", retry_after_s=retry_after_s)


class RateLimitMiddleware:
    """Counts each ``/api/`` request against the address and token limits before routing
    (so requests that fail authentication are counted too); 429 problem+json when over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The lifespan builds the limiter (app.state.rate_limiter); None: limits are off.
        limiter = getattr(scope["app"].state, "rate_limiter", None) if "app" in scope else None
        if limiter is None or scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        try:
            await limiter.check_request(token=bearer_of(scope), address=address_of(scope))
        except RateLimited as e:
            await rate_limited(e)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def address_of(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def bearer_of(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None
