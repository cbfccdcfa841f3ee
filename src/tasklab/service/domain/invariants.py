"""``check_invariants``: what must hold on the live database, whatever the load or the faults.

- stock is never negative, and for every product ``initial_stock - sold == stock`` (sold: the
  quantities of paid orders);
- for every user, balance == sum of their ledger, and never negative;
- every points change of an order is one ledger row: a paid order that used points has exactly
  one row of ``-use_points``, a refunded one that row and its ``refund`` (netting 0), any
  other order none;
- every order is pending, paid, rejected, cancelled or refunded, and none stays pending longer
  than a threshold;
- no order is pending once its settlement job is over (SUCCEEDED, DEAD or CANCELLED) or gone:
  nothing would settle it (a job that gives up rejects it, ``settlement_failed``, in the same
  transaction), and no order rejected with ``settlement_failed`` has a job that SUCCEEDED (a
  retried job that ran settles it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.database import make_engine
from tasklab.jobs.records import FINAL, JobStatus
from tasklab.jobs.records import jobs as jobs_table
from tasklab.service.domain.models import (
    LedgerEntry,
    Order,
    OrderItem,
    OrderStatus,
    PointAccount,
    Product,
    RejectReason,
    User,
)
from tasklab.settings import Settings

DEFAULT_PENDING_THRESHOLD_S = 60.0
MAX_LISTED = 20  # violations listed per kind; the rest are counted


def check_invariants(
    settings: Settings,
    *,
    pending_threshold_s: float = DEFAULT_PENDING_THRESHOLD_S,
    now: float | None = None,
) -> list[str]:
    """Every violation found, one line each; empty if all hold."""
    now = time.time() if now is None else now
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            return [
                *_stock(conn),
                *_balances(conn),
                *_order_points(conn),
                *_statuses(conn),
                *_stuck(conn, now, pending_threshold_s),
                *_settlement_jobs(conn),
            ]
    finally:
        engine.dispose()


def _listed(lines: Iterable[str]) -> list[str]:
    out = list(lines)
    if len(out) > MAX_LISTED:
        return [*out[:MAX_LISTED], f"... and {len(out) - MAX_LISTED} more like these"]
    return out


def _stock(conn: Connection) -> list[str]:
    sold = (
        sa.select(OrderItem.product_id, sa.func.sum(OrderItem.quantity).label("n"))
        .join(Order, Order.id == OrderItem.order_id)
        .where(Order.status == OrderStatus.PAID.value)
        .group_by(OrderItem.product_id)
        .subquery()
    )
    n_sold = sa.func.coalesce(sold.c.n, 0)
    rows = conn.execute(
        sa.select(Product.id, Product.stock, Product.initial_stock, n_sold.label("sold"))
        .outerjoin(sold, sold.c.product_id == Product.id)
        .where(sa.or_(Product.stock < 0, Product.initial_stock - n_sold != Product.stock))
        .order_by(Product.id)
    )
    return _listed(_stock_line(r) for r in rows)


def _stock_line(r: Any) -> str:
    if r.stock < 0:
        return f"product {r.id}: stock is negative ({r.stock})"
    return (
        f"product {r.id}: initial stock {r.initial_stock} - sold {r.sold} = "
        f"{r.initial_stock - r.sold}, but stock is {r.stock}"
    )


def _balances(conn: Connection) -> list[str]:
    ledger = (
        sa.select(LedgerEntry.user_id, sa.func.sum(LedgerEntry.delta).label("total"))
        .group_by(LedgerEntry.user_id)
        .subquery()
    )
    balance = sa.func.coalesce(PointAccount.balance, 0)
    total = sa.func.coalesce(ledger.c.total, 0)
    rows = conn.execute(
        sa.select(User.id, balance.label("balance"), total.label("total"))
        .outerjoin(PointAccount, PointAccount.user_id == User.id)
        .outerjoin(ledger, ledger.c.user_id == User.id)
        .where(sa.or_(balance < 0, balance != total))
        .order_by(User.id)
    )
    return _listed(
        f"user {r.id}: balance {r.balance} "
        + ("is negative" if r.balance < 0 else f"!= sum of ledger {r.total}")
        for r in rows
    )


def _order_points(conn: Connection) -> list[str]:
    spent = (
        sa.select(
            LedgerEntry.order_id,
            sa.func.sum(LedgerEntry.delta).label("total"),
            sa.func.count().label("n"),
        )
        .where(LedgerEntry.order_id.is_not(None))
        .group_by(LedgerEntry.order_id)
        .subquery()
    )
    paid = Order.status == OrderStatus.PAID.value
    wrong_paid = sa.and_(
        paid,
        Order.use_points > 0,
        sa.or_(spent.c.n.is_(None), spent.c.n != 1, spent.c.total != -Order.use_points),
    )
    refunded = Order.status == OrderStatus.REFUNDED.value
    # a refunded order that used points: its spend and its refund, netting 0
    wrong_refunded = sa.and_(
        refunded,
        Order.use_points > 0,
        sa.or_(spent.c.n.is_(None), spent.c.n != 2, spent.c.total != 0),
    )
    used_none = sa.or_(sa.not_(refunded), Order.use_points == 0)
    wrong_unpaid = sa.and_(sa.not_(paid), used_none, spent.c.n.is_not(None))
    rows = conn.execute(
        sa.select(Order.id, Order.status, Order.use_points, spent.c.total, spent.c.n)
        .outerjoin(spent, spent.c.order_id == Order.id)
        .where(sa.or_(wrong_paid, wrong_refunded, wrong_unpaid))
        .order_by(Order.id)
    )
    return _listed(
        f"order {r.id} ({r.status}, use_points {r.use_points}): "
        f"{r.n or 0} ledger row(s) totalling {r.total or 0}"
        for r in rows
    )


def _statuses(conn: Connection) -> list[str]:
    valid = [s.value for s in OrderStatus]
    rows = conn.execute(
        sa.select(Order.id, Order.status).where(Order.status.not_in(valid)).order_by(Order.id)
    )
    return _listed(f"order {r.id}: unknown status {r.status!r}" for r in rows)


def _stuck(conn: Connection, now: float, threshold_s: float) -> list[str]:
    rows = conn.execute(
        sa.select(Order.id, Order.created_at)
        .where(Order.status == OrderStatus.PENDING.value, Order.created_at < now - threshold_s)
        .order_by(Order.id)
    )
    return _listed(f"order {r.id}: pending for {now - r.created_at:.0f} s" for r in rows)


def _settlement_jobs(conn: Connection) -> list[str]:
    """Orders whose state contradicts their settlement job's (``Order.job_id``)."""
    job = jobs_table.c
    pending = Order.status == OrderStatus.PENDING.value
    gave_up = sa.and_(
        Order.status == OrderStatus.REJECTED.value,
        Order.reason == RejectReason.SETTLEMENT_FAILED.value,
    )
    stranded = sa.and_(pending, sa.or_(job.id.is_(None), job.status.in_([s.value for s in FINAL])))
    rows = conn.execute(
        sa.select(Order.id, Order.status, Order.job_id, job.status.label("job_status"))
        .outerjoin(jobs_table, job.id == Order.job_id)
        .where(
            Order.job_id.is_not(None),
            sa.or_(stranded, sa.and_(gave_up, job.status == JobStatus.SUCCEEDED.value)),
        )
        .order_by(Order.id)
    )
    return _listed(_settlement_line(r) for r in rows)


def _settlement_line(r: Any) -> str:
    if r.status != OrderStatus.PENDING.value:
        return f"order {r.id}: rejected settlement_failed, but its job {r.job_id} SUCCEEDED"
    if r.job_status is None:
        return f"order {r.id}: pending, but its job {r.job_id} does not exist"
    return (
        f"order {r.id}: pending, but its job {r.job_id} is {r.job_status}: nothing will settle it"
    )
