"""Abuse limits: requests per bearer token and per client address, and failed
authentications per address, counted by the ``limits`` library (fixed windows).

The counters live in Redis, shared by every API process. While Redis does not answer, each
process counts in its own memory (``limits``' MemoryStorage) and tries Redis again after
``SHARED_RETRY_S``: the limits get looser by the number of processes, never switched off.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from starlette.types import ASGIApp, Receive, Scope, Send

from tasklab.service.domain.errors import RateLimited
from tasklab.service.problems import rate_limited
from tasklab.settings import Settings

log = logging.getLogger("tasklab.service.limits")
KEY_PREFIX = "tasklab:rl"
SHARED_RETRY_S = 2.0
REDIS_TIMEOUT_S = 0.25  # a limit check must not hold a request longer than this
_WHAT = {"auth-failed": "failed authentications from this address"}


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


def storage_uri(redis_url: str) -> str:
    """``limits``' spelling of a redis-py URL (``async+redis://``, ``async+redis+unix://``)."""
    if redis_url.startswith("unix://"):
        return "async+redis+unix://" + redis_url.removeprefix("unix://")
    return "async+" + redis_url


def token_key(token: str) -> str:
    """Tokens are counted by digest: the raw secret never reaches Redis."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class RateLimiter:
    def __init__(self, limits: Limits, *, redis_url: str | None) -> None:
        self.limits = limits
        self._pool = (
            aioredis.ConnectionPool.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
            if redis_url
            else None
        )
        self._shared = (
            FixedWindowRateLimiter(
                RedisStorage(
                    storage_uri(redis_url),
                    wrap_exceptions=True,
                    implementation="redispy",
                    key_prefix=KEY_PREFIX,
                    connection_pool=self._pool,  # type: ignore[arg-type]  # passed to redis-py
                )
            )
            if redis_url
            else None
        )
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
        return self._shared is not None and time.monotonic() >= self._shared_down_until

    async def check_request(self, *, token: str | None, address: str) -> None:
        """Count one request; raise RateLimited naming the limit it went over."""
        await self._hit(self.limits.per_address, "address", address)
        if token:
            await self._hit(self.limits.per_token, "token", token_key(token))

    async def check_auth_allowed(self, address: str) -> None:
        """Refuse an address whose failed authentications used up their budget (no query)."""
        item = self.limits.failed_auth_per_address
        limiter, allowed = await self._apply("test", item, "auth-failed", address)
        if not allowed:
            raise await self._refusal(limiter, item, "auth-failed", address)

    async def note_failed_auth(self, address: str) -> None:
        await self._apply("hit", self.limits.failed_auth_per_address, "auth-failed", address)

    async def _hit(self, item: RateLimitItem, kind: str, key: str) -> None:
        limiter, allowed = await self._apply("hit", item, kind, key)
        if not allowed:
            raise await self._refusal(limiter, item, kind, key)

    async def _apply(
        self, op: str, item: RateLimitItem, kind: str, key: str
    ) -> tuple[FixedWindowRateLimiter, bool]:
        """``hit`` or ``test`` on the shared counters, else on this process's."""
        if self._shared is not None and self.shared:
            try:
                return self._shared, await getattr(self._shared, op)(item, kind, key)
            except StorageError as e:
                self._shared_failed(e)
        return self._local, await getattr(self._local, op)(item, kind, key)

    def _shared_failed(self, error: StorageError) -> None:
        log.warning(
            "rate limit counters unavailable in Redis (%s): counting in this process for %.0f s",
            type(error.storage_error).__name__,
            SHARED_RETRY_S,
        )
        self._shared_down_until = time.monotonic() + SHARED_RETRY_S

    async def _refusal(
        self, limiter: FixedWindowRateLimiter, item: RateLimitItem, kind: str, key: str
    ) -> RateLimited:
        try:
            stats = await limiter.get_window_stats(item, kind, key)
            retry_after_s = max(1, math.ceil(stats.reset_time - time.time()))
        except StorageError:
            retry_after_s = item.get_expiry()
        what = _WHAT.get(kind, f"requests per {kind}")
        return RateLimited(f"too many {what}: the limit is {item}", retry_after_s=retry_after_s)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


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
