"""Bearer-token authentication with a short in-process cache of token -> user.

A hit costs one sha256 and a dict lookup; a miss one primary-key SELECT. Tokens are keyed in
the cache by their digest (never the raw token), only successes are cached, and an entry lives
``ttl_s`` seconds, so a rotated token (``tasklab seed``) stops working within that time.
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

AUTH_CACHE_TTL_S = 10.0
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
        max_entries: int = AUTH_CACHE_MAX_ENTRIES,
    ) -> None:
        self.sql = sql
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[bytes, tuple[Principal, float]] = {}

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = await self._lookup(token)
        self._remember(key, principal, now)
        return principal

    async def _lookup(self, token: str) -> Principal:
        parts = tokens.split(token)
        if parts is None:
            raise Unauthorized("invalid bearer token")
        user_id, secret = parts
        stmt = sa.select(User.token_hash, User.is_admin).where(User.id == user_id)
        row = await self.sql.read(lambda conn: conn.execute(stmt).first())
        if row is None or not tokens.matches(secret, row.token_hash):
            raise Unauthorized("invalid bearer token")
        return Principal(user_id, bool(row.is_admin))

    def _remember(self, key: bytes, principal: Principal, now: float) -> None:
        if len(self._cache) >= self.max_entries:
            self._cache.clear()  # rare; cheaper than tracking recency on every hit
        self._cache[key] = (principal, now + self.ttl_s)

    def forget_all(self) -> None:
        self._cache.clear()
