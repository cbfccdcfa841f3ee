"""``tasklab load`` for a few seconds with a few users against the lab's own reference service:
Locust's files, our JSON's shape, the invariants afterwards. Never the speed."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from tasklab.lab.errors import LabError
from tasklab.lab.load import LoadSizes, read_failures, run_load, slug
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json, slo


def test_a_short_load_reports_every_endpoint_and_the_shop_stays_consistent(
    lab_settings: Settings, console: Console
) -> None:
    result = run_load(lab_settings, sizes=LoadSizes.tiny(), console=console)
    data = read_json(result.path)
    f = data["figures"]

    assert data["command"] == "load"
    assert data["params"]["user_classes"] == ["ShopUser", "OrderUser", "SyncUser"]
    for endpoint in ("points", "history", "expiring", "order", "all"):
        assert f[f"{endpoint}.requests"] > 0, endpoint
        for stat in ("requests_per_s", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99"):
            assert f"{endpoint}.{stat}" in f, (endpoint, stat)
    assert f["all.requests"] >= f["points.requests"] + f["order.requests"]
    assert 0 <= f["all.success_pct"] <= 100
    assert f["shop.orders"] >= 1 and f["shop.orders_lost"] == 0
    assert f["shop.invariant_violations"] == 0
    assert slo(data, "shop.invariant_violations")["pass"] is True
    assert {row["endpoint"] for row in data["tables"]["endpoints"]} >= {"points", "order", "all"}
    assert isinstance(data["tables"]["failures"], list)
    assert {s["chart"] for s in data["series"]} >= {
        "load: response time",
        "load: requests per second",
    }
    out = Path(data["params"]["locust_output"])
    for name in ("locust_stats.csv", "locust_failures.csv", "locust.html", "locust.json"):
        assert (out / name).is_file(), name
    shown = printed(console)
    assert "tasklab load: endpoints" in shown and "P99 ms" in shown


def test_the_points_class_only_reads_balances(lab_settings: Settings, console: Console) -> None:
    result = run_load(lab_settings, sizes=LoadSizes.tiny(), classes=["points"], console=console)
    data = read_json(result.path)
    f = data["figures"]
    assert data["params"]["user_classes"] == ["PointsUser"]
    assert f["points.requests"] > 0 and f["all.success_pct"] == 100
    assert {row["endpoint"] for row in data["tables"]["endpoints"]} - {"setup"} == {"points", "all"}
    assert f["shop.orders"] == 0 and f["shop.invariant_violations"] == 0


def test_the_catalog_class_reads_the_catalog_through_its_cache(
    lab_settings: Settings, console: Console
) -> None:
    result = run_load(lab_settings, sizes=LoadSizes.tiny(), classes=["catalog"], console=console)
    data = read_json(result.path)
    f = data["figures"]
    assert data["params"]["user_classes"] == ["CatalogUser"]
    assert f["products.requests"] > 0 and f["product.requests"] > 0
    assert f["all.success_pct"] == 100
    # every read looks the catalog up; the few loads are each key's first read
    assert f["catalog.cache_lookups"] >= f["products.requests"] + f["product.requests"]
    assert f["catalog.cache_loads"] < f["catalog.cache_lookups"] / 2
    assert 0 < f["catalog.cache_hit_pct"] <= 100 and f["catalog.stock_lookups"] > 0


def test_a_running_service_needs_the_tokens_of_its_users(
    lab_settings: Settings, console: Console
) -> None:
    with pytest.raises(LabError, match="--tokens"):
        run_load(lab_settings, url="http://127.0.0.1:9", console=console)
    with pytest.raises(LabError, match="unknown user class"):
        run_load(lab_settings, classes=["shop", "robots"], console=console)


def test_failures_are_read_by_endpoint_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "locust_failures.csv"
    path.write_text(
        "Method,Name,Error,Occurrences,First Seen,Last Seen\n"
        "POST,order,HTTP 503,7,1,2\n"
        "GET,points,\"ConnectionRefusedError(111, 'refused')\",2,1,2\n"
    )
    assert read_failures(path) == [
        {"endpoint": "order", "method": "POST", "reason": "HTTP 503", "count": 7},
        {
            "endpoint": "points",
            "method": "GET",
            "reason": "ConnectionRefusedError(111, 'refused')",
            "count": 2,
        },
    ]
    assert read_failures(tmp_path / "missing.csv") == []
    assert [slug(n) for n in ("products (setup)", "sync-batch", "sync flow")] == [
        "setup",
        "sync_batch",
        "sync_flow",
    ]
