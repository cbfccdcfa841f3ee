from __future__ import annotations

import threading

import pytest

from tasklab.cache import CacheConfigError, CacheEntry, MemoryBackend
from tests.cache.conftest import metric


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(value: object, clock: FakeClock, ttl_s: float = 60.0, **kw: object) -> CacheEntry:
    return CacheEntry(value, clock.now + ttl_s, **kw)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_the_least_recently_used_entry_is_evicted_first_when_full(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=3, name="lru", clock=clock)
    for key in "abc":
        l1.set(key, entry(key, clock))
    assert l1.get("a") is not None  # a becomes the most recently used
    l1.set("d", entry("d", clock))
    assert "b" not in l1
    assert {k for k in "acd" if k in l1} == {"a", "c", "d"}
    assert len(l1) == 3
    assert l1.evictions == 1


def test_an_entry_expires_after_its_ttl_and_counts_as_an_eviction(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=10, name="ttl-test", clock=clock)
    before = metric("tasklab_cache_evictions_total", cache="ttl-test")
    l1.set("k", entry("v", clock, ttl_s=5))
    clock.now += 4.9
    got = l1.get("k")
    assert got is not None and got.value == "v"
    clock.now += 0.2
    assert l1.get("k") is None
    assert len(l1) == 0
    assert l1.evictions == 1
    assert metric("tasklab_cache_evictions_total", cache="ttl-test") == before + 1
    assert metric("tasklab_cache_l1_entries", cache="ttl-test") == 0


def test_delete_tag_removes_the_tagged_entries_and_no_other(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=10, clock=clock)
    l1.set("p1", entry(1, clock, tags=("shop",)))
    l1.set("p2", entry(2, clock, tags=("shop", "sale")))
    l1.set("u1", entry(3, clock))
    assert sorted(l1.delete_tag("shop")) == ["p1", "p2"]
    assert "u1" in l1 and "p1" not in l1 and "p2" not in l1
    assert l1.delete_tag("sale") == []  # the index forgot p2 when it left


def test_a_fill_is_dropped_if_the_key_was_invalidated_after_it_began(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=10, clock=clock)
    token = l1.begin_fill("k")
    l1.delete("k")  # an invalidation arrives while the reader waits for Redis
    assert not l1.finish_fill("k", token, entry("old", clock))
    assert "k" not in l1
    token = l1.begin_fill("k")
    assert l1.finish_fill("k", token, entry("current", clock))
    assert l1.get("k").value == "current"  # type: ignore[union-attr]


def test_a_local_write_cancels_a_fill_in_flight(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=10, clock=clock)
    token = l1.begin_fill("k")
    l1.set("k", entry("new", clock))
    assert not l1.finish_fill("k", token, entry("old", clock))
    assert l1.get("k").value == "new"  # type: ignore[union-attr]


def test_drop_suspect_removes_only_entries_written_during_an_outage(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=10, clock=clock)
    l1.set("trusted", entry(1, clock))
    l1.set("suspect", entry(2, clock, suspect=True))
    assert l1.drop_suspect() == 1
    assert "trusted" in l1 and "suspect" not in l1


def test_concurrent_writers_and_readers_never_exceed_max_entries() -> None:
    l1 = MemoryBackend(max_entries=50)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(2000):
                key = f"k{(i * 7 + offset) % 200}"
                l1.set(key, CacheEntry(i, l1.expires_at(60)))
                l1.get(f"k{i % 200}")
                assert len(l1) <= 50
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(l1) == 50


def test_an_l1_needs_room_for_at_least_one_entry() -> None:
    with pytest.raises(CacheConfigError):
        MemoryBackend(max_entries=0)


def test_a_writer_alone_stores_its_value_and_cancels_older_fills(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=10, clock=clock)
    reader = l1.begin_fill("k")
    writer = l1.begin_write("k")
    late_reader = l1.begin_fill("k")  # began while the write is in flight: may read the old
    assert l1.finish_write("k", writer, entry("new", clock))
    assert not l1.finish_fill("k", reader, entry("old", clock))
    assert not l1.finish_fill("k", late_reader, entry("old", clock))
    assert l1.get("k").value == "new"  # type: ignore[union-attr]


def test_overlapping_writers_store_nothing_and_leave_no_copy(clock: FakeClock) -> None:
    # Which of two overlapping writes landed last in Redis is unknowable here: keep neither.
    l1 = MemoryBackend(max_entries=10, clock=clock)
    l1.set("k", entry("before", clock))
    first, second = l1.begin_write("k"), l1.begin_write("k")
    assert not l1.finish_write("k", second, entry("second", clock))
    assert not l1.finish_write("k", first, entry("first", clock))
    assert "k" not in l1
    third = l1.begin_write("k")  # no writer left: the next one stores again
    assert l1.finish_write("k", third, entry("third", clock))


def test_an_invalidation_during_a_write_makes_it_remove_the_key(clock: FakeClock) -> None:
    l1 = MemoryBackend(max_entries=10, clock=clock)
    writer = l1.begin_write("k")
    l1.delete_many(["k"])  # another process changed the key meanwhile
    l1.set("k", entry("filled by someone", clock))
    assert not l1.finish_write("k", writer, entry("mine", clock))
    assert "k" not in l1
