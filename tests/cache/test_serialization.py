from __future__ import annotations

import dataclasses
import logging

import pytest

from tasklab.cache import (
    CacheConfigError,
    CacheSerializationError,
    OrjsonSerializer,
    PickleSerializer,
)
from tasklab.cache.serialization import Codec, serializer_for
from tests.cache.conftest import CacheFactory


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def codec(choice: str = "orjson", **kw: bool) -> Codec:
    return Codec(serializer_for(choice, **kw))


def test_orjson_round_trips_plain_values_and_keeps_the_ttls() -> None:
    raw = codec().encode({"a": [1, 2.5, "x", None]}, written_at=10.0, ttl_s=60, l1_ttl_s=5)
    decoded = codec().decode(raw)
    assert decoded.value == {"a": [1, 2.5, "x", None]}
    assert (decoded.written_at, decoded.ttl_s, decoded.l1_ttl_s) == (10.0, 60, 5)


def test_not_found_is_stored_as_its_own_kind_and_reads_back_as_none() -> None:
    raw = codec().encode(None, written_at=1.0, ttl_s=30, l1_ttl_s=30)
    assert raw[:1] == b"n"
    assert codec().decode(raw).value is None


def test_a_value_json_cannot_represent_raises_a_serialization_error() -> None:
    with pytest.raises(CacheSerializationError, match="allow_pickle"):
        OrjsonSerializer().dumps({1, 2})


def test_pickle_is_refused_unless_explicitly_allowed(make_cache: CacheFactory) -> None:
    with pytest.raises(CacheConfigError, match="allow_pickle"):
        PickleSerializer()
    with pytest.raises(CacheConfigError):
        serializer_for("pickle")
    with pytest.raises(CacheConfigError):
        make_cache(serializer="pickle")


def test_a_cache_without_pickle_refuses_to_load_a_pickled_payload() -> None:
    raw = codec("pickle", allow_pickle=True).encode(Point(1, 2), written_at=0, ttl_s=1, l1_ttl_s=1)
    with pytest.raises(CacheSerializationError, match="refusing"):
        codec().decode(raw)


def test_a_pickle_enabled_cache_stores_any_object_for_other_processes(
    make_cache: CacheFactory,
) -> None:
    writer = make_cache(serializer="pickle", allow_pickle=True, mode="l2")
    reader = make_cache(serializer="pickle", allow_pickle=True, mode="l2")
    writer.set("p", {Point(1, 2)})
    assert reader.get("p") == {Point(1, 2)}


def test_a_pickled_entry_found_in_redis_is_a_miss_for_an_orjson_cache_and_never_raises(
    make_cache: CacheFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_cache(serializer="pickle", allow_pickle=True, mode="l2").set("p", Point(1, 2))
    reader = make_cache(mode="l2")
    with caplog.at_level(logging.WARNING, logger="tasklab.cache"):
        assert reader.get("p") is None
        assert reader.get_or_set("p", lambda: "fallback") == "fallback"
    assert reader.stats()["l2"]["errors"] >= 1
    assert any("refusing" in r.getMessage() for r in caplog.records)


def test_an_unknown_serializer_name_is_a_configuration_error() -> None:
    with pytest.raises(CacheConfigError, match="unknown serializer"):
        serializer_for("yaml")
