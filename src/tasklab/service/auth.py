"""Bearer-token authentication with a short in-process cache of token -> user.

A hit costs one sha256 and a dict lookup; a miss one primary-key SELECT. Tokens are keyed in
the cache by their digest (never the raw token). A success lives ``ttl_s`` seconds (never past
the token's expiry), so a rotated or revoked token (``tasklab seed``, ``tasklab tokens
revoke``) stops working within that time. A failure lives ``failure_ttl_s`` seconds: retrying
a bad token costs no query. Each failure also counts against the address's failed-auth
budget (tasklab.service.rate_limits); an address over it is refused before any lookup.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import sqlalchemy as sa

from tasklab.database import SqlRunner
from tasklab.service.domain import tokens
from tasklab.service.domain.errors import Unauthorized
from tasklab.service.domain.models import User
from tasklab.service.rate_limits import RateLimiter

AUTH_CACHE_TTL_S = 10.0
AUTH_FAILURE_TTL_S = 5.0
AUTH_CACHE_MAX_ENTRIES = 50_000


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: int
    is_admin: bool


class Authenticator:
    def __init__(
        self,
        sql: SqlRunner,
        *,
        ttl_s: float = AUTH_CACHE_TTL_S,
        failure_ttl_s: float = AUTH_FAILURE_TTL_S,
        max_entries: int = AUTH_CACHE_MAX_ENTRIES,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.sql = sql
        self.ttl_s = ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.max_entries = max_entries
        self.limiter = limiter
        self._cache: dict[bytes, tuple[Principal | None, float]] = {}

    async def authenticate(self, token: str | None, *, address: str = "unknown") -> Principal:
        if not token:
            await self._failed(address)
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        key = hashlib.sha256(token.encode()).digest()
        now = time.time()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            if hit[0] is None:
                await self._failed(address)
                raise Unauthorized("invalid bearer token")
            return hit[0]
        if self.limiter is not None:
            await self.limiter.check_auth_allowed(address)
        try:
            principal, expires_at = await self._lookup(token)
        except Unauthorized:
            self._remember(key, None, now + self.failure_ttl_s)
            await self._failed(address)
            raise
        self._remember(key, principal, min(now + self.ttl_s, expires_at or float("inf")))
        return principal

    async def _lookup(self, token: str) -> tuple[Principal, float | None]:
        parts = tokens.split(token)
        if parts is None:
            raise Unauthorized("invalid bearer token")
        user_id, secret = parts
        stmt = sa.select(User.token_hash, User.is_admin, User.token_expires_at).where(
            User.id == user_id
        )
        row = await self.sql.read(lambda conn: conn.execute(stmt).first())
        if row is None or not tokens.matches(secret, row.token_hash):
            raise Unauthorized("invalid bearer token")
        if row.token_expires_at is not None and row.token_expires_at <= time.time():
            raise Unauthorized("the bearer token has expired: ask for a new one")
        return Principal(user_id, bool(row.is_admin)), row.token_expires_at

    async def _failed(self, address: str) -> None:
        if self.limiter is not None:
            await self.limiter.note_failed_auth(address)

    def _remember(self, key: bytes, principal: Principal | None, until: float) -> None:
        if len(self._cache) >= self.max_entries:
            self._cache.clear()  # rare; cheaper than tracking recency on every hit
        self._cache[key] = (principal, until)

    def forget_all(self) -> None:
        self._cache.clear()
