"""How values are stored in Redis: a 25-byte header, then the serialized value.

``orjson`` is the default: fast, and loading it never runs code. ``pickle`` stores any Python
object but executes code on load, so whoever can write to Redis could run code in every process
that reads the cache; it must be enabled explicitly (``allow_pickle=True``), and a cache that has
not enabled it refuses to load a pickled payload it finds in Redis.

Header: ``kind`` (1 byte: ``j`` orjson, ``p`` pickle, ``n`` "not found", ``t`` tombstone),
then big-endian doubles
``written_at`` (epoch seconds), ``ttl_s`` and ``l1_ttl_s``. Every process filling its L1 from
Redis keeps the writer's TTLs, and early refresh knows the entry's age.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any, NamedTuple, Protocol

import orjson

from tasklab.cache.errors import CacheConfigError, CacheSerializationError

HEADER = struct.Struct(">cddd")
NOT_FOUND_KIND = b"n"
TOMBSTONE_KIND = b"t"  # "deleted just now": a miss, and it fences off loads that began earlier


class Serializer(Protocol):
    """Turns values into bytes and back. ``kind`` is the one-byte tag written in the header."""

    kind: bytes

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class OrjsonSerializer:
    """JSON via orjson. Tuples come back as lists, dataclasses and datetimes as dicts/strings."""

    kind = b"j"

    def dumps(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except TypeError as e:
            raise CacheSerializationError(
                f"cannot store {type(value).__name__} as JSON ({e}); convert it to plain "
                "dicts/lists first, or use serializer='pickle' with allow_pickle=True"
            ) from e

    def loads(self, data: bytes) -> Any:
        return orjson.loads(data)


class PickleSerializer:
    """Any picklable object. Only for caches whose Redis is as trusted as the code itself."""

    kind = b"p"

    def __init__(self, *, allow_pickle: bool = False) -> None:
        if not allow_pickle:
            raise CacheConfigError(
                "pickle runs code from the cache when it loads a value; enable it explicitly "
                "with allow_pickle=True, or keep the default serializer='orjson'"
            )

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise CacheSerializationError(f"cannot pickle {type(value).__name__}: {e}") from e

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)  # opted in with allow_pickle=True


def serializer_for(choice: str | Serializer, *, allow_pickle: bool = False) -> Serializer:
    """``"orjson"``, ``"pickle"`` (needs ``allow_pickle=True``) or a ``Serializer`` instance."""
    if not isinstance(choice, str):
        return choice
    if choice == "orjson":
        return OrjsonSerializer()
    if choice == "pickle":
        return PickleSerializer(allow_pickle=allow_pickle)
    raise CacheConfigError(f"unknown serializer {choice!r}; expected 'orjson' or 'pickle'")


class Envelope(NamedTuple):
    """A decoded stored value. ``value`` is None for a cached "not found"."""

    value: Any
    written_at: float
    ttl_s: float
    l1_ttl_s: float


class Codec:
    """Encodes values with one serializer; decodes that serializer's payloads and "not found".

    Decoding a payload of another kind fails, except orjson, which is always safe to read.
    """

    def __init__(self, serializer: Serializer) -> None:
        self.serializer = serializer
        self._readers: dict[bytes, Serializer] = {
            OrjsonSerializer.kind: OrjsonSerializer(),
            serializer.kind: serializer,
        }

    def encode(self, value: Any, *, written_at: float, ttl_s: float, l1_ttl_s: float) -> bytes:
        if value is None:
            return HEADER.pack(NOT_FOUND_KIND, written_at, ttl_s, l1_ttl_s)
        payload = self.serializer.dumps(value)
        return HEADER.pack(self.serializer.kind, written_at, ttl_s, l1_ttl_s) + payload

    @staticmethod
    def tombstone(*, written_at: float) -> bytes:
        """A unique "deleted" marker: loads that saw the key before it must not store."""
        return HEADER.pack(TOMBSTONE_KIND, written_at, 0.0, 0.0) + os.urandom(8)

    @staticmethod
    def is_tombstone(raw: bytes) -> bool:
        return raw[:1] == TOMBSTONE_KIND

    def decode(self, raw: bytes) -> Envelope:
        try:
            kind, written_at, ttl_s, l1_ttl_s = HEADER.unpack_from(raw)
        except struct.error as e:
            raise CacheSerializationError("stored value has no tasklab cache header") from e
        if kind == NOT_FOUND_KIND:
            return Envelope(None, written_at, ttl_s, l1_ttl_s)
        reader = self._readers.get(kind)
        if reader is None:
            raise CacheSerializationError(
                f"refusing to load a {kind!r} payload: this cache reads only "
                f"{sorted(k.decode() for k in self._readers)} (pickle needs allow_pickle=True)"
            )
        try:
            value = reader.loads(raw[HEADER.size :])
        except Exception as e:  # any decoder error means the same thing: unusable payload
            raise CacheSerializationError(f"cannot decode stored {kind!r} payload: {e}") from e
        return Envelope(value, written_at, ttl_s, l1_ttl_s)


__all__ = [
    "Codec",
    "Envelope",
    "OrjsonSerializer",
    "PickleSerializer",
    "Serializer",
    "serializer_for",
]
