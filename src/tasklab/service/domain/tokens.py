"""Bearer tokens: ``<user_id>.<secret>``; only sha256(secret) is stored.

The user id selects the row (it is not secret); the secret's hash is then compared in
constant time. The secret is 32 random bytes, so a plain sha256 is enough (no password
hashing needed: there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_BYTES = 32
MAX_TOKEN_CHARS = 200
MAX_ID = 2**31 - 1  # ids are 32-bit integers in the database


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(user_id: int) -> tuple[str, str]:
    """A new (token, stored hash) for ``user_id``."""
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return f"{user_id}.{secret}", hash_secret(secret)


def split(token: str) -> tuple[int, str] | None:
    """(user_id, secret), or None if the token is not of our shape."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    user_part, sep, secret = token.partition(".")
    if not sep or not secret or not user_part.isascii() or not user_part.isdigit():
        return None
    if len(user_part) > 10 or int(user_part) > MAX_ID:
        return None
    return int(user_part), secret


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret).encode(), stored_hash.encode())
