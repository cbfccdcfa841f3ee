"""Issuing and revoking a user's bearer token (``tasklab tokens issue|revoke``).

A user has one token: issuing replaces it (the old one stops working), with an expiry when
``ttl_s`` is given. Revoking leaves no token at all. A running API may accept a replaced or
revoked token for up to its auth cache's lifetime (``tasklab.service.auth.AUTH_CACHE_TTL_S``,
10 s) and never past the token's expiry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa

from tasklab.database import make_engine
from tasklab.errors import TasklabError
from tasklab.service.domain import tokens
from tasklab.service.domain.models import User
from tasklab.settings import Settings


class UnknownUser(TasklabError):
    """No user has this name or id."""

    def __init__(self, user: str) -> None:
        self.user = user
        super().__init__(f"no user {user!r} (a name or an id of `tasklab seed`'s users)")


@dataclass(frozen=True)
class Issued:
    user_id: int
    name: str
    token: str
    expires_at: float | None


def _find(user: str) -> sa.ColumnElement[bool]:
    return User.id == int(user) if user.isdigit() else User.name == user


def issue(
    settings: Settings, user: str, *, ttl_s: float | None = None, now: float | None = None
) -> Issued:
    """A new token for ``user`` (a name or an id), replacing theirs."""
    now = time.time() if now is None else now
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            row = conn.execute(sa.select(User.id, User.name).where(_find(user))).first()
            if row is None:
                raise UnknownUser(user)
            token, token_hash = tokens.issue(row.id)
            expires_at = None if ttl_s is None else now + ttl_s
            conn.execute(
                sa.update(User)
                .where(User.id == row.id)
                .values(token_hash=token_hash, token_expires_at=expires_at)
            )
    finally:
        engine.dispose()
    return Issued(row.id, row.name, token, expires_at)


def revoke(settings: Settings, user: str) -> int:
    """Leave ``user`` without a valid token; returns their id."""
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            # An empty hash matches no secret (tokens.matches compares digests).
            done = conn.execute(
                sa.update(User)
                .where(_find(user))
                .values(token_hash="", token_expires_at=time.time())
                .returning(User.id)
            ).first()
    finally:
        engine.dispose()
    if done is None:
        raise UnknownUser(user)
    return int(done.id)
