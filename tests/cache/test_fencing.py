"""A load that read the source before a change must not store its stale result after it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from tasklab.cache import TieredCache, warm_from
from tasklab.settings import Settings
from tests.cache.conftest import CacheFactory


def load_racing(cache: TieredCache, key: str, change: object) -> str:
    """get_or_set(key) whose loader reads "v1", then ``change()`` runs, then it returns."""
    read_done, changed = threading.Event(), threading.Event()

    def loader() -> str:
        value = "v1"  # read from the database...
        read_done.set()
        assert changed.wait(5)  # ...while someone else changes it
        return value

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(cache.get_or_set(key, loader)))
    t.start()
    assert read_done.wait(5)
    change()  # type: ignore[operator]
    changed.set()
    t.join()
    return result[0]


def test_a_delete_in_another_process_during_a_load_fences_off_its_store(
    make_cache: CacheFactory,
) -> None:
    loading, other = make_cache(), make_cache()
    assert loading.wait_coherent() and other.wait_coherent()
    assert load_racing(loading, "k", lambda: other.delete("k")) == "v1"  # the caller gets it
    assert other.get("k") is None  # but Redis does not keep the stale read
    assert loading.l1 is not None and "k" not in loading.l1
    assert loading.get_or_set("k", lambda: "v2") == "v2"
    assert other.get("k") == "v2"


def test_a_set_during_a_load_wins_over_the_loaded_value(make_cache: CacheFactory) -> None:
    loading, other = make_cache(), make_cache()
    assert loading.wait_coherent() and other.wait_coherent()
    load_racing(loading, "k", lambda: other.set("k", "v2"))
    assert loading.get("k") == "v2" and other.get("k") == "v2"


def test_a_local_delete_during_a_load_fences_it_off_in_l1_only_mode(tmp_path: Path) -> None:
    cache = TieredCache(Settings(home_dir=tmp_path), name="local-fence")
    load_racing(cache, "k", lambda: cache.delete("k"))
    assert cache.get("k") is None
    cache.close()


def test_warm_skips_a_key_deleted_while_the_values_were_read(make_cache: CacheFactory) -> None:
    warmer, reader = make_cache(), make_cache()
    warmer.set("k", "old")
    reader.delete("k")  # the product changed after the warm job read it
    warmer.warm([("k", "what the job read"), ("other", 1)])
    assert reader.get("k") is None and reader.get("other") == 1


async def test_an_async_load_is_fenced_off_by_a_delete_too(make_cache: CacheFactory) -> None:
    loading, other = make_cache(), make_cache()
    read_done, changed = asyncio.Event(), asyncio.Event()

    async def loader() -> str:
        read_done.set()
        await changed.wait()
        return "v1"

    task = asyncio.create_task(loading.aget_or_set("k", loader))
    await read_done.wait()
    await other.adelete("k")
    changed.set()
    assert await task == "v1"
    assert await other.aget("k") is None
    await loading.aclose()
    await other.aclose()


def test_warm_leaves_a_value_stored_after_its_source_began_reading(
    make_cache: CacheFactory,
) -> None:
    warmer, writer = make_cache(), make_cache()
    writer.set("k", "old")

    def source() -> list[tuple[str, str]]:
        read = [("k", "what the job read"), ("other", "warm")]
        writer.delete("k")  # the product changed while the job was reading...
        writer.set("k", "fresh")  # ...and a reader stored the new state
        return read

    report = warm_from(warmer, source)
    assert report.keys == 2
    assert writer.get("k") == "fresh" and writer.get("other") == "warm"
    assert warmer.get("k") == "fresh"


def test_warm_still_refreshes_values_older_than_its_read(make_cache: CacheFactory) -> None:
    warmer, reader = make_cache(), make_cache()
    reader.set("k", "old")
    warmer.warm([("k", "new")], read_at=time.time() + 1)
    assert reader.get("k") == "new"
