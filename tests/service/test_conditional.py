"""Conditional GETs on the catalog: an ETag and Cache-Control on each read, 304 with no body
when If-None-Match names the current ETag, a new ETag once the product changed."""

from __future__ import annotations

import httpx
import sqlalchemy as sa
from fastapi import FastAPI

from tasklab.database import make_engine
from tasklab.service.domain.models import Product
from tasklab.settings import Settings
from tests.service.conftest import Account


async def test_a_product_read_again_with_its_etag_is_304_until_it_changes(
    app: FastAPI, client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings
) -> None:
    headers = accounts[0].headers
    first = await client.get("/api/v1/products/2", headers=headers)
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["cache-control"] == "private, no-cache"
    for matching in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await client.get(
            "/api/v1/products/2", headers={**headers, "If-None-Match": matching}
        )
        assert again.status_code == 304 and again.content == b"", matching
        assert again.headers["etag"] == etag
    other = await client.get("/api/v1/products/3", headers={**headers, "If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag

    engine = make_engine(shop_settings)
    with engine.begin() as conn:
        conn.execute(sa.update(Product).where(Product.id == 2).values(stock=Product.stock - 1))
    engine.dispose()
    app.state.services.catalog.cache.invalidate([2])  # what a paid order's commit does
    changed = await client.get("/api/v1/products/2", headers={**headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["stock"] == first.json()["stock"] - 1


async def test_a_listing_page_is_conditional_too(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    headers = accounts[0].headers
    page = await client.get("/api/v1/products?page_size=20", headers=headers)
    assert page.status_code == 200 and page.json()["items"]
    again = await client.get(
        "/api/v1/products?page_size=20", headers={**headers, "If-None-Match": page.headers["etag"]}
    )
    assert again.status_code == 304
    other_page = await client.get(
        "/api/v1/products?page_size=10", headers={**headers, "If-None-Match": page.headers["etag"]}
    )
    assert other_page.status_code == 200
