"""The catalog cache under orders, on real Redis: a paid order drops its products' stock and
nothing else; only canonical listing pages and known products take keys; a catalog change
drops every listing page through one key."""

from __future__ import annotations

import httpx
import redis
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.orm import Session

from tasklab.cache import constants
from tasklab.database import make_engine
from tasklab.service.domain.catalog_cache import CACHE_NAME, STOCK_CACHE_NAME, VERSION_KEY
from tasklab.service.domain.settlement import order_lines, settle_order
from tasklab.settings import Settings
from tests.service.conftest import SEED, Account, StatementCounter

ORDER = {"items": [{"product_id": 1, "quantity": 3}], "use_points": 0}
LISTING = "/api/v1/products?page_size=20"


def _settle(settings: Settings, order_id: int) -> None:
    """What the worker's job does, in this process (whose cache the API registered)."""
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            lines = order_lines(conn, order_id)
        with Session(engine) as session, session.begin():
            assert settle_order(session, order_id, lines)["status"] == "paid"
    finally:
        engine.dispose()


def _value_keys(redis_url: str) -> set[str]:
    """The catalog's value keys in Redis, its stock's included."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return {
            key
            for name in (CACHE_NAME, STOCK_CACHE_NAME)
            for key in client.scan_iter(constants.value_prefix(name) + "*")
        }
    finally:
        client.close()


async def test_a_paid_order_drops_its_products_stock_and_leaves_the_catalog_cached(
    app: FastAPI, client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings
) -> None:
    headers = accounts[0].headers
    assert (await client.get(LISTING, headers=headers)).status_code == 200
    assert (await client.get("/api/v1/products/1", headers=headers)).json()["stock"] == SEED[
        "stock"
    ]
    placed = (await client.post("/api/v1/orders", json=ORDER, headers=headers)).json()
    _settle(shop_settings, placed["order_id"])

    engine = app.state.services.engine.sync_engine
    with StatementCounter(engine) as detail_queries:
        product = (await client.get("/api/v1/products/1", headers=headers)).json()
    assert product["stock"] == SEED["stock"] - 3
    assert detail_queries.count == 1  # the stock alone; the product itself stayed cached
    with StatementCounter(engine) as listing_queries:
        assert (await client.get(LISTING, headers=headers)).status_code == 200
    assert listing_queries.count == 0


async def test_only_canonical_pages_and_existing_products_take_cache_keys(
    client: httpx.AsyncClient, accounts: list[Account], redis_url: str
) -> None:
    headers = accounts[0].headers
    before = _value_keys(redis_url)
    for path in (
        "/api/v1/products?page_size=7",  # not a canonical page size
        "/api/v1/products?page=51&page_size=10",  # past the cached pages
        "/api/v1/products?category=no-such-category",  # an empty page
        "/api/v1/products?page=9&page_size=10",  # past the end: empty
        "/api/v1/products/99999",
    ):
        assert (await client.get(path, headers=headers)).status_code in (200, 404)
    assert _value_keys(redis_url) - before <= {constants.value_key(CACHE_NAME, VERSION_KEY)}
    assert (await client.get(LISTING, headers=headers)).status_code == 200
    assert len(_value_keys(redis_url) - before) == 3  # the version, the page, its stock


async def test_a_catalog_change_drops_every_listing_page_by_one_new_version(
    app: FastAPI, client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings
) -> None:
    headers = accounts[0].headers
    pages = [f"/api/v1/products?page_size=10&sort={s}" for s in ("id", "price", "-name")]
    for path in pages:
        assert (await client.get(path, headers=headers)).status_code == 200
    engine = make_engine(shop_settings)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE shop_products SET name = 'Renamed' WHERE id = 1"))
    engine.dispose()
    cache = app.state.services.catalog.cache
    cache.invalidate_products([1])
    renamed = (await client.get(pages[0], headers=headers)).json()["items"][0]
    assert renamed["name"] == "Renamed"
    with StatementCounter(app.state.services.engine.sync_engine) as reloads:
        for path in pages[1:]:
            assert (await client.get(path, headers=headers)).status_code == 200
    assert reloads.count == 2 * 3  # each page again: rows, total, stock
