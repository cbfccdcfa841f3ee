from __future__ import annotations

import time

from tasklab.cache import beat_entry, warm_from
from tests.cache.conftest import CacheFactory


def test_warm_from_stores_what_the_source_yields_and_reports_it(
    make_cache: CacheFactory,
) -> None:
    writer, reader = make_cache(), make_cache()

    def hottest() -> list[tuple[str, dict[str, int]]]:
        time.sleep(0.05)  # the source's own work is part of the warm-up's duration
        return [(f"product:{i}", {"id": i}) for i in range(3)]

    started = time.perf_counter()
    report = warm_from(writer, hottest, ttl_s=120)
    took_s = time.perf_counter() - started
    assert report.keys == 3 and report.cache == writer.name
    assert 0.05 <= report.duration_s <= took_s
    assert report.as_dict()["keys"] == 3
    assert reader.get_or_set("product:2", lambda: {"id": -1}) == {"id": 2}
    assert reader.counters.loads == 0


def test_the_beat_entry_runs_the_task_every_30_minutes_by_default() -> None:
    assert beat_entry("shop.warm_hot_products") == {
        "task": "shop.warm_hot_products",
        "schedule": 1800.0,
        "kwargs": {},
    }
    assert beat_entry("t", every_s=60, kwargs={"limit": 50})["kwargs"] == {"limit": 50}
