"""Every Redis key and channel name the cache uses, in one place.

A cache named ``products`` owns ``tasklab:cache:products:*``; two caches with different names never
see each other's keys or invalidations.
"""

from __future__ import annotations

PREFIX = "tasklab:cache"


def namespace(cache: str) -> str:
    """Prefix of every key of one cache (used to SCAN it on ``clear()``)."""
    return f"{PREFIX}:{cache}:"


def value_key(cache: str, key: str) -> str:
    return f"{PREFIX}:{cache}:v:{key}"


def value_prefix(cache: str) -> str:
    return f"{PREFIX}:{cache}:v:"


def tag_key(cache: str, tag: str) -> str:
    """A Redis SET of the cache keys carrying ``tag``."""
    return f"{PREFIX}:{cache}:tag:{tag}"


def lock_key(cache: str, key: str) -> str:
    """The cross-process loader lock of one key (``SET NX PX``)."""
    return f"{PREFIX}:{cache}:lock:{key}"


def channel(cache: str) -> str:
    """Pub/sub channel carrying invalidations of one cache's L1 copies."""
    return f"{PREFIX}:{cache}:invalidate"
