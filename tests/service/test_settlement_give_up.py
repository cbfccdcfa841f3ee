"""An order always reaches a final state: when its settlement job gives up (DEAD or CANCELLED,
on every path) the job's give-up hook rejects it (``settlement_failed``) in the same
transaction, having taken nothing; retrying the job settles it, once. On SQLite and on
PostgreSQL, real SQL; the jobs run in an in-process Executor, or in a real worker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tasklab.database import writing
from tasklab.errors import JobStateError
from tasklab.jobs import JobManager, JobStatus, store
from tasklab.jobs.execution import Executor
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.records import jobs as jobs_table
from tasklab.jobs.recovery import Reaper
from tasklab.service.domain import jobs as shop_jobs
from tasklab.service.domain.catalog import prices_of
from tasklab.service.domain.invariants import check_invariants
from tasklab.service.domain.jobs import process_order
from tasklab.service.domain.models import LedgerEntry, Order, PointAccount, Product
from tasklab.service.domain.placement import Line, NewOrder, insert_orders
from tasklab.service.domain.settlement import settle_order
from tasklab.settings import Settings
from tests.service.conftest import Account, count_rows

PRODUCT, QUANTITY, POINTS = 2, 3, 40


@dataclass(frozen=True)
class Placed:
    order_id: int
    job_id: str
    user_id: int


@dataclass(frozen=True)
class Holdings:
    stock: int
    balance: int
    spends: int  # ledger rows of the order


@pytest.fixture
def jm(shop_settings_any_db: Settings) -> Iterator[JobManager]:
    manager = JobManager(shop_settings_any_db, local_fallback=False)
    yield manager
    manager.close()


def place(
    jm: JobManager, *, product_id: int = PRODUCT, quantity: int = QUANTITY, points: int = POINTS
) -> Placed:
    """An order and its settlement job, committed together as the API does; the job is left
    PENDING in SQL (not published: no worker will run it unless the test does)."""
    user_id = 1
    job = jm.prepare(process_order, 0, owner=f"user:{user_id}")
    order = NewOrder(user_id, [Line(product_id, quantity)], points, None, "test", job)
    with writing(jm.engine) as conn:
        prices = prices_of(conn, {product_id})
        (order_id,) = insert_orders(conn, [order], prices)
    assert isinstance(order_id, int)
    return Placed(order_id, job.id, user_id)


def order_state(jm: JobManager, order_id: int) -> tuple[str, str | None]:
    with jm.engine.connect() as conn:
        row = conn.execute(sa.select(Order.status, Order.reason).where(Order.id == order_id)).one()
    return row.status, row.reason


def holdings(jm: JobManager, placed: Placed, product_id: int = PRODUCT) -> Holdings:
    with jm.engine.connect() as conn:
        stock = conn.execute(sa.select(Product.stock).where(Product.id == product_id)).scalar_one()
        balance = conn.execute(
            sa.select(PointAccount.balance).where(PointAccount.user_id == placed.user_id)
        ).scalar_one()
    spends = count_rows(jm.settings, LedgerEntry, LedgerEntry.order_id == placed.order_id)
    return Holdings(int(stock), int(balance), spends)


def executor(jm: JobManager) -> Executor:
    return Executor(
        jm.engine,
        lease_owner="give-up-test",
        via="broker",
        default_lease_s=5,
        leases=LeaseKeeper(jm.engine),
        reschedule=lambda *a: None,  # a retry runs when the test runs it
    )


def claim_expired(jm: JobManager, job_id: str, *, last: bool) -> None:
    """A worker claims the job (its last attempt if ``last``) and is lost: the lease is over."""
    with writing(jm.engine) as conn:
        if last:
            conn.execute(
                sa.update(jobs_table)
                .where(jobs_table.c.id == job_id)
                .values(attempt=jobs_table.c.max_attempts - 1)
            )
        claim = store.claim(job_id, lease_owner="lost", lease_s=-1.0, via="broker", now=time.time())
        assert conn.execute(*claim).first() is not None


def settles_then_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every settlement takes stock and points in its transaction, then fails: the
    transaction rolls back, attempt after attempt."""

    def failing(session: Session, order_id: int, lines: list[tuple[int, int]]) -> Any:
        outcome = settle_order(session, order_id, lines)
        assert outcome["status"] == "paid"  # it took them
        raise RuntimeError("the payment service is down")

    monkeypatch.setattr(shop_jobs, "settle_order", failing)


# --- the ways a settlement job gives up ---------------------------------------------------------


def cancelled_waiting(jm: JobManager, placed: Placed, _mp: pytest.MonkeyPatch) -> JobStatus:
    assert jm.cancel(placed.job_id).status is JobStatus.CANCELLED
    return JobStatus.CANCELLED


def cancelled_running(jm: JobManager, placed: Placed, _mp: pytest.MonkeyPatch) -> JobStatus:
    """Cancelled with terminate while a worker holds it (its transaction not committed)."""
    with writing(jm.engine) as conn:
        claim = store.claim(
            placed.job_id, lease_owner="busy", lease_s=60.0, via="broker", now=time.time()
        )
        assert conn.execute(*claim).first() is not None
    assert jm.cancel(placed.job_id, terminate=True).status is JobStatus.CANCELLED
    return JobStatus.CANCELLED


def dead_every_attempt_failed(
    jm: JobManager, placed: Placed, monkeypatch: pytest.MonkeyPatch
) -> JobStatus:
    settles_then_raises(monkeypatch)
    run = executor(jm)
    outcomes: list[str] = []
    while not outcomes or outcomes[-1] == "retrying":
        outcomes.append(run.run(process_order, placed.job_id).status)
    assert outcomes == ["retrying"] * (process_order.retry.max_attempts - 1) + ["dead"]
    monkeypatch.undo()  # the payment service is back
    return JobStatus.DEAD


def dead_worker_lost_on_last_attempt(
    jm: JobManager, placed: Placed, _mp: pytest.MonkeyPatch
) -> JobStatus:
    claim_expired(jm, placed.job_id, last=True)
    reaper = Reaper(jm.settings, jm.engine, jm.publisher)
    try:
        assert reaper.tick()["lease_expired"] == 1
    finally:
        reaper.close()
    return JobStatus.DEAD


GIVE_UPS: dict[str, Callable[[JobManager, Placed, pytest.MonkeyPatch], JobStatus]] = {
    "cancelled_waiting": cancelled_waiting,
    "cancelled_running": cancelled_running,
    "dead_every_attempt_failed": dead_every_attempt_failed,
    "dead_worker_lost_on_last_attempt": dead_worker_lost_on_last_attempt,
}


@pytest.mark.parametrize("give_up", list(GIVE_UPS))
def test_an_order_whose_settlement_gives_up_is_rejected_and_took_nothing(
    jm: JobManager, monkeypatch: pytest.MonkeyPatch, give_up: str
) -> None:
    placed = place(jm)
    before = holdings(jm, placed)

    ended = GIVE_UPS[give_up](jm, placed, monkeypatch)

    assert jm.get(placed.job_id).status is ended
    assert order_state(jm, placed.order_id) == ("rejected", "settlement_failed")
    assert holdings(jm, placed) == before
    assert check_invariants(jm.settings, pending_threshold_s=0) == []


@pytest.mark.parametrize("give_up", list(GIVE_UPS))
def test_retrying_a_given_up_settlement_pays_the_order_exactly_once(
    jm: JobManager, monkeypatch: pytest.MonkeyPatch, give_up: str
) -> None:
    placed = place(jm)
    before = holdings(jm, placed)
    GIVE_UPS[give_up](jm, placed, monkeypatch)
    run = executor(jm)

    assert jm.retry(placed.job_id).status in (JobStatus.PENDING, JobStatus.QUEUED)
    assert run.run(process_order, placed.job_id).status == "succeeded"

    paid = Holdings(before.stock - QUANTITY, before.balance - POINTS, 1)
    assert order_state(jm, placed.order_id) == ("paid", None)
    assert holdings(jm, placed) == paid
    assert jm.get(placed.job_id).result["status"] == "paid"
    # its message delivered again, a second retry, a duplicate settlement job: nothing more
    assert run.run(process_order, placed.job_id).status == "skipped"
    with pytest.raises(JobStateError):
        jm.retry(placed.job_id)
    duplicate = jm.prepare(process_order, placed.order_id)
    with writing(jm.engine) as conn:
        conn.execute(*duplicate.insert)
    assert run.run(process_order, duplicate.id).status == "succeeded"
    assert jm.get(duplicate.id).result["already_settled"] is True
    assert holdings(jm, placed) == paid
    assert check_invariants(jm.settings, pending_threshold_s=0) == []


def test_a_real_worker_settles_a_retried_order_once(
    jm: JobManager, shop_settings_any_db: Settings, worker_factory: Any
) -> None:
    placed = place(jm)
    before = holdings(jm, placed)
    claim_expired(jm, placed.job_id, last=True)
    reaper = Reaper(jm.settings, jm.engine, jm.publisher)
    try:
        reaper.tick()  # worker lost on the last attempt: DEAD, the order rejected
    finally:
        reaper.close()
    assert order_state(jm, placed.order_id) == ("rejected", "settlement_failed")
    worker_factory(shop_settings_any_db).start()

    jm.retry(placed.job_id)  # tasklab jobs retry <job id>

    done = jm.wait(placed.job_id, timeout_s=60)
    assert done.status is JobStatus.SUCCEEDED and done.result["status"] == "paid"
    assert order_state(jm, placed.order_id) == ("paid", None)
    paid = Holdings(before.stock - QUANTITY, before.balance - POINTS, 1)
    assert holdings(jm, placed) == paid
    again = jm.wait(jm.submit(process_order, placed.order_id).id, timeout_s=60)
    assert again.result["already_settled"] is True
    assert holdings(jm, placed) == paid
    assert check_invariants(jm.settings, pending_threshold_s=0) == []


# --- what the hook and the claim never touch ----------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "settled"), [(QUANTITY, ("paid", None)), (500, ("rejected", "out_of_stock"))]
)
def test_a_settled_order_is_left_alone_by_the_hook_and_by_a_retry(
    jm: JobManager, quantity: int, settled: tuple[str, str | None]
) -> None:
    """A duplicate settlement job settles the order (paid, or rejected out of stock: 500 of
    100); then the order's own job is cancelled (the hook runs), retried and run."""
    placed = place(jm, quantity=quantity)
    duplicate = jm.prepare(process_order, placed.order_id)
    with writing(jm.engine) as conn:
        conn.execute(*duplicate.insert)
    run = executor(jm)
    assert run.run(process_order, duplicate.id).status == "succeeded"
    assert order_state(jm, placed.order_id) == settled
    after = holdings(jm, placed)

    assert jm.cancel(placed.job_id).status is JobStatus.CANCELLED

    assert order_state(jm, placed.order_id) == settled
    assert holdings(jm, placed) == after
    # restocked: a claim that took any rejected order would now sell this one
    with writing(jm.engine) as conn:
        conn.execute(
            sa.update(Product)
            .where(Product.id == PRODUCT)
            .values(stock=Product.stock + 1000, initial_stock=Product.initial_stock + 1000)
        )
    jm.retry(placed.job_id)
    assert run.run(process_order, placed.job_id).status == "succeeded"
    assert jm.get(placed.job_id).result["already_settled"] is True
    assert order_state(jm, placed.order_id) == settled
    assert holdings(jm, placed) == Holdings(after.stock + 1000, after.balance, after.spends)
    assert check_invariants(jm.settings, pending_threshold_s=0) == []


def test_a_stray_settlement_job_giving_up_leaves_the_order_to_its_own_job(
    jm: JobManager,
) -> None:
    placed = place(jm)
    stray = jm.prepare(process_order, placed.order_id)
    with writing(jm.engine) as conn:
        conn.execute(*stray.insert)

    jm.cancel(stray.id)

    assert order_state(jm, placed.order_id) == ("pending", None)
    assert executor(jm).run(process_order, placed.job_id).status == "succeeded"
    assert order_state(jm, placed.order_id) == ("paid", None)


# --- over HTTP ----------------------------------------------------------------------------------


async def test_the_api_shows_an_order_rejected_because_its_settlement_was_cancelled(
    client: httpx.AsyncClient, accounts: list[Account], jobs: JobManager
) -> None:
    alice = accounts[0]
    body = {"items": [{"product_id": 1, "quantity": 1}], "use_points": 0}
    placed = (await client.post("/api/v1/orders", json=body, headers=alice.headers)).json()

    jobs.cancel(placed["job_id"])  # queued in the broker, no worker running

    order = await client.get(f"/api/v1/orders/{placed['order_id']}", headers=alice.headers)
    assert order.status_code == 200
    assert (order.json()["status"], order.json()["reason"]) == ("rejected", "settlement_failed")
    listed = await client.get("/api/v1/orders?status=rejected", headers=alice.headers)
    assert [o["reason"] for o in listed.json()["items"]] == ["settlement_failed"]
    job = await client.get(f"/api/v1/jobs/{placed['job_id']}", headers=alice.headers)
    assert job.json()["status"] == "CANCELLED"
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["Order"]
    reasons = next(s for s in schema["properties"]["reason"]["anyOf"] if "enum" in s)
    assert set(reasons["enum"]) == {"out_of_stock", "insufficient_points", "settlement_failed"}
