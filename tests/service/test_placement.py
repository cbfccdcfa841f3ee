"""Placement: concurrent orders commit together, and a bad one fails alone (both databases)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from tasklab.database import SqlRunner, make_async_engine, make_engine
from tasklab.jobs import JobManager
from tasklab.jobs.records import jobs as jobs_table
from tasklab.service.domain.errors import InvalidField
from tasklab.service.domain.jobs import process_order
from tasklab.service.domain.models import Order, OrderItem, Product
from tasklab.service.domain.placement import Line, NewOrder, Placement
from tasklab.settings import Settings
from tests.service.conftest import count_rows


@pytest.fixture
async def placement(shop_settings_any_db: Settings) -> AsyncIterator[tuple[Placement, Any]]:
    settings = shop_settings_any_db
    engine, async_engine = make_engine(settings), make_async_engine(settings)
    jm = JobManager(settings, engine=engine, local_fallback=False)
    sql = SqlRunner(async_engine, sync_engine=engine)
    with engine.connect() as conn:
        product_ids = list(conn.execute(sa.select(Product.id).order_by(Product.id)).scalars())
    yield Placement(sql), (jm, product_ids)
    await async_engine.dispose()
    jm.close()


def _order(jm: JobManager, user_id: int, lines: list[Line], *, key: str | None = None) -> NewOrder:
    job = jm.prepare(process_order, 0, owner=f"user:{user_id}")
    return NewOrder(user_id, lines, 0, key, f"hash-{user_id}-{key}", job)


async def test_orders_placed_together_get_their_own_ids_items_and_jobs(
    placement: tuple[Placement, Any], shop_settings_any_db: Settings
) -> None:
    place, (jm, products) = placement
    orders = [_order(jm, 1, [Line(products[i % 3], i + 1)]) for i in range(12)]
    ids = await asyncio.gather(*(place.insert(o) for o in orders))
    assert len(set(ids)) == 12
    engine = make_engine(shop_settings_any_db)
    with engine.connect() as conn:
        for order, order_id in zip(orders, ids, strict=True):
            assert order.job.values["args"] == [order_id]
            quantity = conn.execute(
                sa.select(OrderItem.quantity).where(OrderItem.order_id == order_id)
            ).scalar_one()
            assert quantity == order.lines[0].quantity
            job_args = conn.execute(
                sa.select(jobs_table.c.args).where(jobs_table.c.id == order.job.id)
            ).scalar_one()
            assert job_args == [order_id]
    engine.dispose()


async def test_an_order_for_an_unknown_product_fails_alone_and_writes_nothing(
    placement: tuple[Placement, Any], shop_settings_any_db: Settings
) -> None:
    place, (jm, products) = placement
    good = [_order(jm, 1, [Line(products[0], 1)]) for _ in range(3)]
    bad = _order(jm, 1, [Line(products[0], 1), Line(10**9, 1)])
    results = await asyncio.gather(
        *(place.insert(o) for o in [good[0], bad, *good[1:]]), return_exceptions=True
    )
    assert isinstance(results[1], InvalidField) and results[1].field == "items.1.product_id"
    assert all(isinstance(r, int) for r in [results[0], *results[2:]])
    assert count_rows(shop_settings_any_db, Order) == 3
    assert count_rows(shop_settings_any_db, jobs_table, jobs_table.c.id == bad.job.id) == 0


async def test_a_duplicate_idempotency_key_fails_only_its_order(
    placement: tuple[Placement, Any], shop_settings_any_db: Settings
) -> None:
    place, (jm, products) = placement
    await place.insert(_order(jm, 2, [Line(products[0], 1)], key="k1"))
    again = _order(jm, 2, [Line(products[0], 1)], key="k1")
    others = [_order(jm, 2, [Line(products[1], 1)], key=f"other-{i}") for i in range(3)]
    results = await asyncio.gather(
        *(place.insert(o) for o in [others[0], again, *others[1:]]), return_exceptions=True
    )
    assert isinstance(results[1], sa.exc.IntegrityError)
    assert all(isinstance(r, int) for r in [results[0], *results[2:]])
    assert count_rows(shop_settings_any_db, Order, Order.user_id == 2) == 4
