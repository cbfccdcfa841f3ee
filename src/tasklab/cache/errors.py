"""Cache errors. All derive from :class:`tasklab.errors.CacheError`.

Only programming and configuration mistakes reach the caller (a value that cannot be serialized,
pickle without opting in). Redis trouble never does: it is counted, logged and absorbed.
"""

from __future__ import annotations

from tasklab.errors import CacheError


class CacheConfigError(CacheError):
    """The cache was built with options that cannot work together."""


class CacheSerializationError(CacheError):
    """A value could not be encoded, or a stored payload could not (or may not) be decoded."""


class L2Unavailable(CacheError):
    """Redis did not answer, or its circuit is open. Caught inside the cache, never raised out."""


__all__ = ["CacheConfigError", "CacheError", "CacheSerializationError", "L2Unavailable"]
