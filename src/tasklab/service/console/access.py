"""Who may see and operate the console: a signed session cookie (from the login form) or an
``Authorization: Bearer`` token, two roles, and a CSRF token bound to the session.

* A user's API token logs in (``tasklab seed`` writes them): an admin is an ``operator``; a
  user named in ``settings.console_viewers`` is a ``viewer`` (reads only); anyone else is
  refused. Bearer requests carry no ambient credential, so they need no CSRF token.
* The cookie is ``payload.signature`` (HMAC-SHA256). Its key is derived from the admin's
  token digest: rotating the admin token (``tasklab seed``) ends every session at once, and
  every process of the API derives the same key without a shared secret to configure.
* The CSRF token is an HMAC of the session's nonce: a forged form from another site cannot
  know it, and it changes with every login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa

from tasklab.service.auth import Authenticator
from tasklab.service.domain.errors import RateLimited, Unauthorized
from tasklab.service.domain.models import User

COOKIE_NAME = "tasklab_console"
SESSION_TTL_S = 8 * 3600.0
KEY_CACHE_TTL_S = 10.0


class Role(StrEnum):
    OPERATOR = "operator"
    VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Operator:
    """The person behind a request: their name (in the action log) and role."""

    name: str
    role: Role
    nonce: str  # the session's; "" for bearer requests (no CSRF token needed)

    @property
    def can_act(self) -> bool:
        return self.role is Role.OPERATOR


class Refused(Exception):
    """No valid session or token (401), the role may not do this (403), or the address used
    up its failed-login budget (429, with ``retry_after_s``)."""

    def __init__(self, status: int, reason: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class Access:
    """Logins, sessions and CSRF tokens for one app."""

    def __init__(self, auth: Authenticator, viewers: list[str]) -> None:
        self.auth = auth
        self.viewers = frozenset(viewers)
        self._key: tuple[bytes, float] | None = None

    # --- login ---------------------------------------------------------------------------
    async def operator_for_token(self, token: str, *, address: str, nonce: str = "") -> Operator:
        """``address`` is the client's (``rate_limits.address_of``): failed logins count
        against its failed-auth budget, as the API's failed bearer tokens do."""
        try:
            principal = await self.auth.authenticate(token, address=address)
        except Unauthorized as e:
            raise Refused(401, "that token is not valid") from e
        except RateLimited as e:
            raise Refused(429, str(e), retry_after_s=e.retry_after_s) from e
        stmt = sa.select(User.name).where(User.id == principal.user_id)
        name = str(await self.auth.sql.read(lambda conn: conn.execute(stmt).scalar_one()))
        if principal.is_admin:
            return Operator(name, Role.OPERATOR, nonce)
        if name in self.viewers:
            return Operator(name, Role.VIEWER, nonce)
        raise Refused(403, f"user {name!r} has no access to the console")

    async def login(self, token: str, *, address: str) -> tuple[Operator, str]:
        """(the operator, the cookie value of their new session)."""
        operator = await self.operator_for_token(
            token, address=address, nonce=secrets.token_urlsafe(16)
        )
        expires = time.time() + SESSION_TTL_S
        body = {"n": operator.name, "r": operator.role.value, "s": operator.nonce, "e": expires}
        payload = base64.urlsafe_b64encode(json.dumps(body).encode()).decode()
        return operator, f"{payload}.{await self._sign('session', payload)}"

    # --- each request ----------------------------------------------------------------------
    async def from_cookie(self, cookie: str | None) -> Operator:
        if not cookie or "." not in cookie:
            raise Refused(401, "log in first")
        payload, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, await self._sign("session", payload)):
            raise Refused(401, "your session is no longer valid: log in again")
        body = json.loads(base64.urlsafe_b64decode(payload))
        if float(body["e"]) < time.time():
            raise Refused(401, "your session has expired: log in again")
        return Operator(str(body["n"]), Role(body["r"]), str(body["s"]))

    async def csrf_token(self, operator: Operator) -> str:
        return await self._sign("csrf", operator.nonce) if operator.nonce else ""

    async def check_csrf(self, operator: Operator, token: str | None) -> None:
        if not operator.nonce:  # a bearer request: no cookie a forged form could ride on
            return
        if not token or not hmac.compare_digest(token, await self.csrf_token(operator)):
            raise Refused(403, "the form's CSRF token is missing or wrong: reload the page")

    # --- the key ---------------------------------------------------------------------------
    async def _sign(self, purpose: str, value: str) -> str:
        key = await self._signing_key()
        return hmac.new(key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    async def _signing_key(self) -> bytes:
        now = time.monotonic()
        if self._key is not None and self._key[1] > now:
            return self._key[0]
        stmt = sa.select(User.token_hash).where(User.is_admin.is_(True)).order_by(User.id)
        digest = await self.auth.sql.read(lambda conn: conn.execute(stmt.limit(1)).scalar())
        if not digest:
            raise Refused(401, "no admin user yet: run `tasklab seed`")
        key = hashlib.sha256(b"tasklab-console:" + str(digest).encode()).digest()
        self._key = (key, now + KEY_CACHE_TTL_S)
        return key
