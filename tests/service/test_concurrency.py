"""Many concurrent orders over real HTTP, settled by real worker processes: no oversell, no
overdraft, invariants hold. On SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tasklab.database import make_engine
from tasklab.service.domain.invariants import check_invariants
from tasklab.service.domain.models import LedgerEntry, Order, PointAccount, Product
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.service.conftest import ApiServer, make_settings, read_tokens, wait_settled
from tests.service.loadgen import Call, Reply, run_calls

pytestmark = pytest.mark.slow
ORDERS = 1000
STOCK = 100


async def _post_all(
    url: str, requests: list[tuple[dict[str, str], dict[str, object]]], *, connections: int = 32
) -> list[Reply]:
    calls = [Call("POST", "/api/v1/orders", headers, body) for headers, body in requests]
    return await run_calls(url, calls, connections=connections)


async def _start(
    settings: Settings, database_url: str | None, api_server_factory: Any, worker_factory: Any
) -> ApiServer:
    """Start the API and a worker at the same time (each spends seconds importing)."""
    server = api_server_factory(settings)
    # Modest concurrency on SQLite: one writer at a time, more processes only queue.
    worker = worker_factory(settings, concurrency=2 if database_url is None else 4)
    await asyncio.gather(asyncio.to_thread(server.start), asyncio.to_thread(worker.start))
    return server


def _final_state(settings: Settings) -> tuple[Counter[tuple[str, str | None]], int]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        outcomes = Counter((s, r) for s, r in conn.execute(sa.select(Order.status, Order.reason)))
        stock = conn.execute(sa.select(Product.stock).where(Product.id == 1)).scalar_one()
    engine.dispose()
    return outcomes, int(stock)


async def test_a_thousand_concurrent_orders_on_a_hundred_in_stock_sell_exactly_a_hundred(
    tmp_path: Path, redis_url: str, database_url: str | None, worker_factory, api_server_factory
) -> None:
    settings = make_settings(tmp_path, redis_url, database_url)
    seed(settings, users=20, products=2, stock=STOCK, points=0)
    accounts = [a for a in read_tokens(settings.home_dir / "tokens.jsonl") if not a.admin]
    server = await _start(settings, database_url, api_server_factory, worker_factory)

    requests = [
        (
            accounts[i % len(accounts)].headers,
            {"items": [{"product_id": 1, "quantity": 1}], "use_points": 0},
        )
        for i in range(ORDERS)
    ]
    responses = await _post_all(server.url, requests)
    assert Counter(r.status for r in responses) == {202: ORDERS}
    assert len({r.json()["order_id"] for r in responses}) == ORDERS

    await wait_settled(settings)
    outcomes, stock = _final_state(settings)
    assert outcomes == {("paid", None): STOCK, ("rejected", "out_of_stock"): ORDERS - STOCK}
    assert stock == 0
    assert check_invariants(settings, pending_threshold_s=0) == []


async def test_concurrent_orders_exceeding_a_balance_never_overdraw_it(
    tmp_path: Path, redis_url: str, database_url: str | None, worker_factory, api_server_factory
) -> None:
    settings = make_settings(tmp_path, redis_url, database_url)
    seed(settings, users=1, products=3, stock=1000, points=1000)
    user = read_tokens(settings.home_dir / "tokens.jsonl")[0]
    server = await _start(settings, database_url, api_server_factory, worker_factory)

    # 30 orders of 150 points each on a balance of 1,000: at most 6 can be paid.
    body = {"items": [{"product_id": 1, "quantity": 2}], "use_points": 150}
    responses = await _post_all(server.url, [(user.headers, body)] * 30, connections=30)
    assert {r.status for r in responses} == {202}

    await wait_settled(settings)
    engine = make_engine(settings)
    with engine.connect() as conn:
        balance = conn.execute(
            sa.select(PointAccount.balance).where(PointAccount.user_id == user.user_id)
        ).scalar_one()
        ledger = conn.execute(
            sa.select(sa.func.sum(LedgerEntry.delta)).where(LedgerEntry.user_id == user.user_id)
        ).scalar_one()
        outcomes = Counter(conn.execute(sa.select(Order.status, Order.reason)).all())
    engine.dispose()
    assert outcomes[("paid", None)] == 6
    assert outcomes[("rejected", "insufficient_points")] == 24
    assert balance == ledger == 1000 - 6 * 150
    assert check_invariants(settings, pending_threshold_s=0) == []
