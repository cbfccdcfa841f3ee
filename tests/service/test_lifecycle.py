"""Taking an order back, on SQLite and PostgreSQL: a pending order is cancelled and its
settlement then takes nothing; its settlement job is cancelled too (a real worker never runs
it), or, already running, only asked to stop; a paid one is refunded (stock and points back, a
ledger row); asking twice changes nothing twice; a rejected order is a 409, another user's a
404."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tasklab.database import make_engine, writing
from tasklab.jobs import JobManager, JobStatus, store
from tasklab.service.app import create_app
from tasklab.service.domain.invariants import check_invariants
from tasklab.service.domain.models import LedgerEntry, PointAccount, Product
from tasklab.service.domain.settlement import order_lines, settle_order
from tasklab.settings import Settings
from tests.service.conftest import SEED, Account, read_tokens

ORDER = {"items": [{"product_id": 1, "quantity": 3}], "use_points": 100}


@pytest.fixture
async def any_db_client(shop_settings_any_db: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(shop_settings_any_db)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


def _settle(settings: Settings, order_id: int) -> str:
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            lines = order_lines(conn, order_id)
        with Session(engine) as session, session.begin():
            return str(settle_order(session, order_id, lines)["status"])
    finally:
        engine.dispose()


def _state(settings: Settings, user_id: int) -> tuple[int, int, list[tuple[str, int]]]:
    """(stock of product 1, the user's balance, their ledger as (kind, delta), oldest first)."""
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            stock = conn.execute(sa.select(Product.stock).where(Product.id == 1)).scalar_one()
            balance = conn.execute(
                sa.select(PointAccount.balance).where(PointAccount.user_id == user_id)
            ).scalar_one()
            ledger = conn.execute(
                sa.select(LedgerEntry.kind, LedgerEntry.delta)
                .where(LedgerEntry.user_id == user_id, LedgerEntry.order_id.is_not(None))
                .order_by(LedgerEntry.id)
            ).all()
    finally:
        engine.dispose()
    return int(stock), int(balance), [(k, int(d)) for k, d in ledger]


def _alice(settings: Settings) -> Account:
    return read_tokens(settings.home_dir / "tokens.jsonl")[0]


async def test_a_pending_order_is_cancelled_once_and_its_settlement_then_takes_nothing(
    any_db_client: httpx.AsyncClient, shop_settings_any_db: Settings
) -> None:
    settings, alice = shop_settings_any_db, _alice(shop_settings_any_db)
    placed = (await any_db_client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    path = f"/api/v1/orders/{placed['order_id']}/cancel"
    for _ in range(2):
        cancelled = await any_db_client.post(path, headers=alice.headers)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert _settle(settings, placed["order_id"]) == "cancelled"
    assert _state(settings, alice.user_id) == (SEED["stock"], SEED["points"], [])
    assert check_invariants(settings) == []


async def test_cancelling_a_pending_order_cancels_its_settlement_job_which_never_runs(
    any_db_client: httpx.AsyncClient, shop_settings_any_db: Settings, worker_factory: Any
) -> None:
    settings, alice = shop_settings_any_db, _alice(shop_settings_any_db)
    # queued in the broker, no worker running yet
    placed = (await any_db_client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    cancelled = await any_db_client.post(
        f"/api/v1/orders/{placed['order_id']}/cancel", headers=alice.headers
    )
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    job = await any_db_client.get(f"/api/v1/jobs/{placed['job_id']}", headers=alice.headers)
    assert job.json()["status"] == "CANCELLED"

    worker_factory(settings).start()
    later = (await any_db_client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    jm = JobManager(settings, local_fallback=False)
    try:
        assert jm.wait(later["job_id"], timeout_s=60).result["status"] == "paid"
        skipped = jm.get(placed["job_id"])
    finally:
        jm.close()
    assert skipped.status is JobStatus.CANCELLED and skipped.started_at is None
    order = await any_db_client.get(f"/api/v1/orders/{placed['order_id']}", headers=alice.headers)
    assert (order.json()["status"], order.json()["reason"]) == ("cancelled", None)
    # only the later order took stock and points
    assert _state(settings, alice.user_id) == (
        SEED["stock"] - 3,
        SEED["points"] - 100,
        [("spend", -100)],
    )
    assert check_invariants(settings) == []


async def test_cancelling_an_order_whose_settlement_is_running_only_asks_the_job_to_stop(
    any_db_client: httpx.AsyncClient, shop_settings_any_db: Settings
) -> None:
    settings, alice = shop_settings_any_db, _alice(shop_settings_any_db)
    placed = (await any_db_client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    engine = make_engine(settings)
    try:
        with writing(engine) as conn:  # a worker took the job and is settling the order
            claim = store.claim(
                placed["job_id"], lease_owner="w1", lease_s=60, via="broker", now=time.time()
            )
            assert conn.execute(*claim).first() is not None
    finally:
        engine.dispose()

    path = f"/api/v1/orders/{placed['order_id']}/cancel"
    for _ in range(2):
        cancelled = await any_db_client.post(path, headers=alice.headers)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    jm = JobManager(settings, local_fallback=False)
    try:
        running = jm.get(placed["job_id"])
    finally:
        jm.close()
    assert running.status is JobStatus.STARTED and running.cancel_requested
    # the running settlement then finds the order cancelled: its state is the guard
    assert _settle(settings, placed["order_id"]) == "cancelled"
    assert _state(settings, alice.user_id) == (SEED["stock"], SEED["points"], [])
    assert check_invariants(settings) == []


async def test_a_paid_order_is_refunded_once_with_its_stock_and_points_back(
    any_db_client: httpx.AsyncClient, shop_settings_any_db: Settings
) -> None:
    settings, alice = shop_settings_any_db, _alice(shop_settings_any_db)
    placed = (await any_db_client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    assert _settle(settings, placed["order_id"]) == "paid"
    product = (await any_db_client.get("/api/v1/products/1", headers=alice.headers)).json()
    assert product["stock"] == SEED["stock"] - 3
    assert _state(settings, alice.user_id)[:2] == (SEED["stock"] - 3, SEED["points"] - 100)

    path = f"/api/v1/orders/{placed['order_id']}/cancel"
    for _ in range(2):
        refunded = await any_db_client.post(path, headers=alice.headers)
        assert refunded.status_code == 200 and refunded.json()["status"] == "refunded"
    assert _state(settings, alice.user_id) == (
        SEED["stock"],
        SEED["points"],
        [("spend", -100), ("refund", 100)],
    )
    product = (await any_db_client.get("/api/v1/products/1", headers=alice.headers)).json()
    assert product["stock"] == SEED["stock"]  # the stock cache heard of the refund
    assert check_invariants(settings) == []


async def test_a_rejected_order_is_a_409_and_another_users_order_a_404(
    any_db_client: httpx.AsyncClient, shop_settings_any_db: Settings
) -> None:
    settings = shop_settings_any_db
    alice, bob = read_tokens(settings.home_dir / "tokens.jsonl")[:2]
    too_many = {"items": [{"product_id": 2, "quantity": SEED["stock"] + 1}], "use_points": 0}
    placed = (
        await any_db_client.post("/api/v1/orders", json=too_many, headers=alice.headers)
    ).json()
    assert _settle(settings, placed["order_id"]) == "rejected"
    path = f"/api/v1/orders/{placed['order_id']}/cancel"
    refused = await any_db_client.post(path, headers=alice.headers)
    assert refused.status_code == 409
    assert refused.json()["type"] == "urn:tasklab:problem:not-cancellable"
    pending = (await any_db_client.post("/api/v1/orders", json=ORDER, headers=alice.headers)).json()
    other = await any_db_client.post(
        f"/api/v1/orders/{pending['order_id']}/cancel", headers=bob.headers
    )
    assert other.status_code == 404
    mine = await any_db_client.get(f"/api/v1/orders/{pending['order_id']}", headers=alice.headers)
    assert mine.json()["status"] == "pending"
