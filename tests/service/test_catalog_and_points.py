"""The catalog (paged, filtered, sorted) and the points views, over ASGI."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from tests.service.conftest import SEED, Account


async def test_products_are_paged_with_a_total(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    headers = accounts[0].headers
    first = (await client.get("/api/v1/products?page=1&page_size=4", headers=headers)).json()
    second = (await client.get("/api/v1/products?page=2&page_size=4", headers=headers)).json()
    assert (first["total"], first["page"], first["page_size"]) == (SEED["products"], 1, 4)
    ids = [p["id"] for p in first["items"] + second["items"]]
    assert ids == sorted(ids) and len(set(ids)) == SEED["products"]
    assert set(first["items"][0]) >= {"id", "name", "category", "price", "stock"}
    assert first["items"][0]["stock"] == SEED["stock"]


async def test_products_are_filtered_by_category_and_sorted_by_price_or_name(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    headers = accounts[0].headers
    everything = (await client.get("/api/v1/products?page_size=100", headers=headers)).json()
    category = everything["items"][0]["category"]
    only = (await client.get(f"/api/v1/products?category={category}", headers=headers)).json()
    assert only["total"] == sum(p["category"] == category for p in everything["items"])
    assert {p["category"] for p in only["items"]} == {category}
    for sort, key, reverse in (
        ("price", "price_cents", False),
        ("-price", "price_cents", True),
        ("name", "name", False),
        ("-name", "name", True),
    ):
        items = (
            await client.get(f"/api/v1/products?sort={sort}&page_size=100", headers=headers)
        ).json()["items"]
        assert [p[key] for p in items] == sorted((p[key] for p in items), reverse=reverse)


async def test_one_product_is_read_by_id(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    product = (await client.get("/api/v1/products/3", headers=accounts[0].headers)).json()
    assert product["id"] == 3 and product["price"] == product["price_cents"] / 100
    assert product["name"] == "Product 00003"


async def test_the_balance_history_and_expiring_points_come_from_the_seeded_grant(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    alice = accounts[0]
    balance = (await client.get("/api/v1/points", headers=alice.headers)).json()
    assert balance["user_id"] == alice.user_id and balance["balance"] == SEED["points"]
    history = (await client.get("/api/v1/points/history", headers=alice.headers)).json()
    assert history["total"] == 2 and sum(e["delta"] for e in history["items"]) == SEED["points"]
    assert history["items"][0]["id"] > history["items"][1]["id"]  # newest first
    soon = (await client.get("/api/v1/points/expiring?days=7", headers=alice.headers)).json()
    assert soon["total"] == SEED["points"] // 5 and len(soon["items"]) == 1
    expires_at = datetime.fromisoformat(soon["items"][0]["expires_at"])
    assert datetime.now(UTC) < expires_at < datetime.now(UTC) + timedelta(days=7)
    days_left = (expires_at - datetime.now(UTC)).days + 1
    window = f"/api/v1/points/expiring?days={days_left - 1}"
    assert (await client.get(window, headers=alice.headers)).json()["total"] == 0
