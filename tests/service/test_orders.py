"""Orders: 202 pending with a job, settled by a real worker to paid or rejected with a reason;
idempotency keys; own listing; a bounded number of queries per listing."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import httpx
import pytest
from fastapi import FastAPI

from tasklab.jobs import JobManager
from tasklab.jobs.records import jobs as jobs_table
from tasklab.service.domain.invariants import check_invariants
from tasklab.service.domain.models import LedgerEntry, Order
from tasklab.settings import Settings
from tests.service.conftest import Account, StatementCounter, count_rows, wait_settled


def _order(product_id: int = 1, quantity: int = 1, use_points: int = 0) -> dict[str, object]:
    return {"items": [{"product_id": product_id, "quantity": quantity}], "use_points": use_points}


async def _product(client: httpx.AsyncClient, account: Account, product_id: int) -> dict:
    return (await client.get(f"/api/v1/products/{product_id}", headers=account.headers)).json()


async def _stock_within(
    client: httpx.AsyncClient, account: Account, product_id: int, expected: int, *, timeout_s: float
) -> bool:
    """The cached product shows ``expected`` stock within ``timeout_s`` (the worker's
    invalidation reaches this process's L1 just after its commit), long before the TTL."""
    deadline = time.monotonic() + timeout_s
    while (await _product(client, account, product_id))["stock"] != expected:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_an_order_is_accepted_pending_with_its_job_and_readable_at_once(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    alice = accounts[0]
    response = await client.post(
        "/api/v1/orders", json=_order(quantity=3, use_points=5), headers=alice.headers
    )
    assert response.status_code == 202
    placed = response.json()
    assert placed["status"] == "pending" and len(placed["job_id"]) == 32

    order = (await client.get(f"/api/v1/orders/{placed['order_id']}", headers=alice.headers)).json()
    assert order["status"] == "pending" and order["reason"] is None
    assert order["job_id"] == placed["job_id"] and order["use_points"] == 5
    assert [(i["product_id"], i["quantity"]) for i in order["items"]] == [(1, 3)]
    assert datetime.fromisoformat(order["created_at"]).tzinfo is not None

    job = (await client.get(f"/api/v1/jobs/{placed['job_id']}", headers=alice.headers)).json()
    assert job["task"] == "tasklab.shop.process_order" and job["status"] == "QUEUED"
    assert job["celery_task_id"] and job["via"] == "broker"
    assert set(job["progress"]) == {"current", "total", "message"}


async def test_a_worker_pays_or_rejects_orders_and_only_paid_ones_take_stock_and_points(
    client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings, worker_factory
) -> None:
    alice = accounts[0]
    price = (await _product(client, alice, 2))["price_cents"]  # also caches product 2
    stock_before = (await _product(client, alice, 2))["stock"]
    big_spend = min(price * 20, 1500)  # more than the balance (1,000), within the total
    placed = {}
    for name, body in {
        "paid": _order(2, 2, use_points=100),
        "no_stock": _order(2, 500),
        "no_points": _order(2, 20, big_spend),
    }.items():
        placed[name] = (
            await client.post("/api/v1/orders", json=body, headers=alice.headers)
        ).json()
    worker_factory(shop_settings).start()
    await wait_settled(shop_settings)

    def get(name: str) -> httpx.Response:
        return client.get(f"/api/v1/orders/{placed[name]['order_id']}", headers=alice.headers)

    outcomes = {
        name: (r.json()["status"], r.json()["reason"])
        for name, r in zip(placed, await asyncio.gather(*map(get, placed)), strict=True)
    }
    assert outcomes == {
        "paid": ("paid", None),
        "no_stock": ("rejected", "out_of_stock"),
        "no_points": ("rejected", "insufficient_points"),
    }
    assert await _stock_within(client, alice, 2, stock_before - 2, timeout_s=5)
    balance = (await client.get("/api/v1/points", headers=alice.headers)).json()["balance"]
    assert balance == 1000 - 100
    history = (await client.get("/api/v1/points/history", headers=alice.headers)).json()
    assert history["items"][0]["delta"] == -100
    assert history["items"][0]["order_id"] == placed["paid"]["order_id"]
    job = (
        await client.get(f"/api/v1/jobs/{placed['paid']['job_id']}", headers=alice.headers)
    ).json()
    assert job["status"] == "SUCCEEDED" and job["result"]["status"] == "paid"
    assert job["finished_at"] and job["attempt"] == 1
    assert check_invariants(shop_settings, pending_threshold_s=0) == []


async def test_the_same_idempotency_key_returns_the_same_order(
    client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings
) -> None:
    alice, bob = accounts[0], accounts[1]
    headers = {**alice.headers, "Idempotency-Key": "checkout-123"}
    first = await client.post("/api/v1/orders", json=_order(), headers=headers)
    again = await client.post("/api/v1/orders", json=_order(), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    other_user = await client.post(
        "/api/v1/orders", json=_order(), headers={**bob.headers, "Idempotency-Key": "checkout-123"}
    )
    assert other_user.json()["order_id"] != first.json()["order_id"]
    assert count_rows(shop_settings, Order) == 2
    assert count_rows(shop_settings, jobs_table) == 2


async def test_an_idempotency_key_reused_with_another_body_is_a_409_conflict(
    client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings
) -> None:
    headers = {**accounts[0].headers, "Idempotency-Key": "k-1"}
    await client.post("/api/v1/orders", json=_order(quantity=1), headers=headers)
    response = await client.post("/api/v1/orders", json=_order(quantity=2), headers=headers)
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("idempotency-conflict")
    assert count_rows(shop_settings, Order) == 1


async def test_concurrent_requests_with_one_idempotency_key_create_one_order(
    client: httpx.AsyncClient, accounts: list[Account], shop_settings: Settings
) -> None:
    headers = {**accounts[0].headers, "Idempotency-Key": "double-click"}
    responses = await asyncio.gather(
        *(client.post("/api/v1/orders", json=_order(), headers=headers) for _ in range(10))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({(r.json()["order_id"], r.json()["job_id"]) for r in responses}) == 1
    assert count_rows(shop_settings, Order) == 1
    assert count_rows(shop_settings, jobs_table) == 1


async def test_own_orders_are_listed_newest_first_paged_and_filtered_by_status(
    client: httpx.AsyncClient, accounts: list[Account]
) -> None:
    alice = accounts[0]
    ids = [
        (
            await client.post("/api/v1/orders", json=_order(quantity=q), headers=alice.headers)
        ).json()["order_id"]
        for q in (1, 2, 3)
    ]
    page1 = (await client.get("/api/v1/orders?page=1&page_size=2", headers=alice.headers)).json()
    page2 = (await client.get("/api/v1/orders?page=2&page_size=2", headers=alice.headers)).json()
    assert [o["id"] for o in page1["items"] + page2["items"]] == ids[::-1]
    assert (page1["total"], page1["page"], page1["page_size"]) == (3, 1, 2)
    newest = page1["items"][0]
    assert [(i["product_id"], i["quantity"]) for i in newest["items"]] == [(1, 3)]
    assert newest["total_cents"] == 3 * round(newest["items"][0]["unit_price"] * 100)
    paid = (await client.get("/api/v1/orders?status=paid", headers=alice.headers)).json()
    pending = (await client.get("/api/v1/orders?status=pending", headers=alice.headers)).json()
    assert (paid["total"], pending["total"]) == (0, 3)


@pytest.mark.parametrize(
    "path", ["/api/v1/orders", "/api/v1/products", "/api/v1/points/history", "/api/v1/jobs"]
)
async def test_a_listing_runs_the_same_few_queries_whatever_the_page_size(
    client: httpx.AsyncClient, app: FastAPI, accounts: list[Account], path: str
) -> None:
    alice = accounts[0]
    for q in range(1, 8):
        await client.post(
            "/api/v1/orders", json=_order(product_id=1 + q % 3, quantity=q), headers=alice.headers
        )
    app.state.services.catalog.cache = None  # count the database queries, not cache hits
    counts = []
    for size in (1, 5, 100):
        with StatementCounter(app.state.services.engine.sync_engine) as counter:
            response = await client.get(f"{path}?page_size={size}", headers=alice.headers)
        assert response.status_code == 200
        assert len(response.json()["items"]) == min(size, response.json()["total"])
        counts.append(counter.count)
    assert counts[0] == counts[1] == counts[2] <= 3, counts


async def test_settling_an_order_twice_charges_it_once(
    accounts: list[Account], shop_settings: Settings, client: httpx.AsyncClient
) -> None:
    """Two settlement jobs for one order (a duplicate submit), run by the local executor
    (the broker is unreachable): one pays, the other finds the order settled."""
    from tasklab.service.domain.jobs import process_order

    placed = (
        await client.post("/api/v1/orders", json=_order(use_points=7), headers=accounts[0].headers)
    ).json()
    no_broker = shop_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    manager = JobManager(no_broker)
    try:
        runs = [manager.submit(process_order, placed["order_id"]) for _ in range(2)]
        results = [manager.wait(j.id, timeout_s=30).result for j in runs]
    finally:
        manager.close()
    assert sorted(r["status"] for r in results) == ["paid", "paid"]
    assert sorted(bool(r.get("already_settled")) for r in results) == [False, True]
    assert count_rows(shop_settings, LedgerEntry, LedgerEntry.order_id == placed["order_id"]) == 1
    assert (
        count_rows(
            shop_settings,
            LedgerEntry,
            LedgerEntry.order_id == placed["order_id"],
            LedgerEntry.delta == -7,
        )
        == 1
    )
