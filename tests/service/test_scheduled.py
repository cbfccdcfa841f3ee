"""The shop's scheduled work on SQLite and PostgreSQL: points expire by ledger rows (never
more than the balance, once), and the hot products' catalog entries are warmed into Redis;
beat schedules both on the scheduled queue."""

from __future__ import annotations

import time

import httpx
import sqlalchemy as sa

from tasklab.database import make_engine
from tasklab.service.app import create_app
from tasklab.service.domain.catalog_cache import CatalogCache, detail_key
from tasklab.service.domain.invariants import check_invariants
from tasklab.service.domain.models import LedgerEntry, PointAccount
from tasklab.service.domain.scheduled import (
    EXPIRE_POINTS_TASK,
    WARM_HOT_PRODUCTS_TASK,
    expire_points,
    hot_product_items,
    warm_hot_products_now,
)
from tasklab.service.domain.seed import DAY_S
from tasklab.settings import Settings
from tasklab.worker import beat_schedule
from tests.service.conftest import SEED, StatementCounter, read_tokens


def _balance_and_expired(settings: Settings, user_id: int) -> tuple[int, list[int]]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        balance = conn.execute(
            sa.select(PointAccount.balance).where(PointAccount.user_id == user_id)
        ).scalar_one()
        expired = conn.execute(
            sa.select(LedgerEntry.delta)
            .where(LedgerEntry.user_id == user_id, LedgerEntry.kind == "expire")
            .order_by(LedgerEntry.id)
        ).scalars()
        result = int(balance), [int(d) for d in expired]
    engine.dispose()
    return result


def _spend(settings: Settings, user_id: int, points: int) -> None:
    engine = make_engine(settings)
    with engine.begin() as conn:
        conn.execute(
            sa.update(PointAccount)
            .where(PointAccount.user_id == user_id)
            .values(balance=PointAccount.balance - points)
        )
        conn.execute(
            sa.insert(LedgerEntry).values(
                user_id=user_id, delta=-points, kind="spend", created_at=time.time()
            )
        )
    engine.dispose()


def test_grants_past_expiry_leave_the_balance_by_ledger_rows_once_and_never_below_zero(
    shop_settings_any_db: Settings,
) -> None:
    settings = shop_settings_any_db
    alice = read_tokens(settings.home_dir / "tokens.jsonl")[0]
    soon, rest = SEED["points"] // 5, SEED["points"] - SEED["points"] // 5
    engine = make_engine(settings)
    try:
        in_a_week = time.time() + 7 * DAY_S
        assert expire_points(engine, now=time.time()) == 0  # nothing due yet
        first = expire_points(engine, now=in_a_week)
        assert first == soon * (SEED["users"] + 1)  # every user's soon-expiring fifth
        assert _balance_and_expired(settings, alice.user_id) == (rest, [-soon])
        assert expire_points(engine, now=in_a_week) == 0  # done once

        _spend(settings, alice.user_id, rest - 10)  # 10 left; the long grant is larger
        expire_points(engine, now=time.time() + 400 * DAY_S)
        assert _balance_and_expired(settings, alice.user_id) == (0, [-soon, -10])
    finally:
        engine.dispose()
    assert check_invariants(settings) == []


async def test_the_hottest_products_are_warmed_into_the_catalog_cache(
    shop_settings: Settings,
) -> None:
    user = read_tokens(shop_settings.home_dir / "tokens.jsonl")[0]
    app = create_app(shop_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        for product_id, quantity in ((3, 5), (2, 1), (3, 1)):
            body = {"items": [{"product_id": product_id, "quantity": quantity}], "use_points": 0}
            assert (await c.post("/api/v1/orders", json=body, headers=user.headers)).is_success
        engine = make_engine(shop_settings)
        with engine.connect() as conn:
            items = hot_product_items(conn)
        assert [key for key, _ in items] == [detail_key(3), detail_key(2)]
        assert "stock" not in items[0][1]

        report = warm_hot_products_now(shop_settings, engine)
        engine.dispose()
        assert report["keys"] == 2
        with StatementCounter(app.state.services.engine.sync_engine) as counter:
            product = (await c.get("/api/v1/products/3", headers=user.headers)).json()
        assert product["name"] == items[0][1]["name"]
        assert counter.count == 1  # its stock only: the product came warm from Redis


def test_beat_schedules_points_expiry_and_the_warm_up_on_the_scheduled_queue(
    shop_settings: Settings,
) -> None:
    entries = {e["task"]: e for e in beat_schedule(shop_settings).values()}
    for task in (EXPIRE_POINTS_TASK, WARM_HOT_PRODUCTS_TASK):
        assert entries[task]["options"]["queue"] == "scheduled"
        assert entries[task]["schedule"] > 0


def test_a_cache_is_left_alone_without_redis(shop_settings: Settings) -> None:
    no_redis = shop_settings.model_copy(update={"redis_url": None})
    assert CatalogCache.for_settings(no_redis) is None
    engine = make_engine(shop_settings)
    try:
        assert warm_hot_products_now(no_redis, engine)["keys"] == 0
    finally:
        engine.dispose()
