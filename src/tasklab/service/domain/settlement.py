"""Settling an order inside the job's transaction: take stock, then points, or reject.

Every change is a conditional UPDATE (``stock >= :q``, ``balance >= :p``) whose row count says
whether it happened, so concurrent settlements never oversell nor overdraw, on SQLite (one
writer at a time) and on PostgreSQL (the row lock re-checks the condition after waiting). Rows
are touched in one order (products by id, then the account), so two settlements cannot
deadlock. A rejection is a normal outcome: what was taken is put back in the same transaction.

When the settlement job gives up (DEAD: its attempts ran out, or its worker was lost on the
last one; CANCELLED), ``gave_up`` (its ``on_give_up`` hook) rejects the order with
``settlement_failed`` in the transaction that ends the job: the settlement is one transaction,
and one that never committed took nothing. Retrying the job (``tasklab jobs retry``) may still
settle it: the claim takes a pending order or one rejected with ``settlement_failed``, never
a paid one nor one rejected for another reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from tasklab.jobs.hooks import Ended
from tasklab.service.domain.catalog_cache import invalidate_after_commit
from tasklab.service.domain.models import (
    LedgerEntry,
    LedgerKind,
    Order,
    OrderItem,
    OrderStatus,
    PointAccount,
    Product,
    RejectReason,
    table,
)

_orders, _items, _products = table(Order), table(OrderItem), table(Product)
_accounts, _ledger = table(PointAccount), table(LedgerEntry)

log = logging.getLogger("tasklab.shop")
_PENDING = _orders.c.status == OrderStatus.PENDING.value
# Rejected because its settlement job gave up: nothing was taken, a retry may settle it.
_GAVE_UP = sa.and_(
    _orders.c.status == OrderStatus.REJECTED.value,
    _orders.c.reason == RejectReason.SETTLEMENT_FAILED.value,
)

# Built once; executed on the session's connection (Core), which skips the ORM's per-call
# statement handling: a settlement is ten statements and runs inside the write lock.
_CLAIM = (
    sa.update(_orders)
    .where(_orders.c.id == sa.bindparam("p_id"), sa.or_(_PENDING, _GAVE_UP))
    .values(updated_at=sa.bindparam("p_now"))
    .returning(_orders.c.user_id, _orders.c.use_points)
)
_STATUS = sa.select(_orders.c.status, _orders.c.reason).where(_orders.c.id == sa.bindparam("p_id"))
_LINES = (
    sa.select(_items.c.product_id, sa.func.sum(_items.c.quantity))
    .where(_items.c.order_id == sa.bindparam("p_id"))
    .group_by(_items.c.product_id)
    .order_by(_items.c.product_id)
)
_TAKE_STOCK = (
    sa.update(_products)
    .where(_products.c.id == sa.bindparam("p_id"), _products.c.stock >= sa.bindparam("p_qty"))
    .values(stock=_products.c.stock - sa.bindparam("p_qty"), updated_at=sa.bindparam("p_now"))
)
_PUT_BACK = (
    sa.update(_products)
    .where(_products.c.id == sa.bindparam("p_id"))
    .values(stock=_products.c.stock + sa.bindparam("p_qty"), updated_at=sa.bindparam("p_now"))
)
_TAKE_POINTS = (
    sa.update(_accounts)
    .where(
        _accounts.c.user_id == sa.bindparam("p_user"), _accounts.c.balance >= sa.bindparam("p_pts")
    )
    .values(balance=_accounts.c.balance - sa.bindparam("p_pts"), updated_at=sa.bindparam("p_now"))
)
_SPEND = sa.insert(_ledger)
_FINISH = (
    sa.update(_orders)
    .where(_orders.c.id == sa.bindparam("p_id"))
    .values(
        status=sa.bindparam("p_status"),
        reason=sa.bindparam("p_reason"),
        updated_at=sa.bindparam("p_now"),
    )
)
# The give-up hook: only a pending order (never a paid one, nor one rejected already), and
# only for its own settlement job (a stray duplicate job giving up leaves it to its own job).
_REJECT_GAVE_UP = (
    sa.update(_orders)
    .where(
        _orders.c.id == sa.bindparam("p_id"),
        _PENDING,
        sa.or_(_orders.c.job_id == sa.bindparam("p_job"), _orders.c.job_id.is_(None)),
    )
    .values(
        status=OrderStatus.REJECTED.value,
        reason=RejectReason.SETTLEMENT_FAILED.value,
        updated_at=sa.bindparam("p_now"),
    )
)


def order_lines(conn: Connection, order_id: int) -> list[tuple[int, int]]:
    """(product_id, quantity) per product, ordered by product id (the lock order). An order's
    lines never change: read them before the write transaction, which then holds SQLite's
    write lock for less time."""
    return [(int(pid), int(qty)) for pid, qty in conn.execute(_LINES, {"p_id": order_id})]


def settle_order(session: Session, order_id: int, lines: list[tuple[int, int]]) -> dict[str, Any]:
    """Settle ``order_id`` whose ``lines`` (``order_lines``) were read before."""
    conn = session.connection()
    now = time.time()
    # Taking the order's row is the first write: it also takes SQLite's write lock, and the
    # row lock on PostgreSQL. None if it is settled (paid, or rejected for a reason other
    # than a settlement that gave up).
    order = conn.execute(_CLAIM, {"p_id": order_id, "p_now": now}).first()
    if order is None:
        return _already_settled(conn, order_id)
    reason = _take_stock(conn, lines, now)
    if reason is None and order.use_points:
        reason = _take_points(conn, order.user_id, order.use_points, order_id, now)
        if reason is not None:
            _put_back(conn, lines, now)
    status = OrderStatus.PAID if reason is None else OrderStatus.REJECTED
    if status is OrderStatus.PAID:
        invalidate_after_commit(session, [product_id for product_id, _ in lines])
    conn.execute(
        _FINISH, {"p_id": order_id, "p_status": status.value, "p_reason": reason, "p_now": now}
    )
    return {"order_id": order_id, "status": status.value, "reason": reason}


def gave_up(conn: Connection, ended: Ended) -> None:
    """``process_order``'s give-up hook: in the transaction that makes the job DEAD or
    CANCELLED, reject its order (``settlement_failed``) if it is still pending. The settlement
    is one transaction: had it committed, the order would be settled (and is left alone);
    a pending order took no stock and no points, so there is nothing to put back."""
    order_id = ended.args[0] if ended.args else ended.kwargs.get("order_id")
    if not isinstance(order_id, int) or isinstance(order_id, bool):
        log.warning("job %s (%s) gave up without an order id: %r", ended.id, ended.task, order_id)
        return
    rejected = conn.execute(
        _REJECT_GAVE_UP, {"p_id": order_id, "p_job": ended.id, "p_now": time.time()}
    ).rowcount
    if rejected:
        log.warning(
            "order %s rejected (settlement_failed): its job %s ended %s: %s",
            order_id,
            ended.id,
            ended.status.value,
            ended.error,
        )


def _already_settled(conn: Connection, order_id: int) -> dict[str, Any]:
    row = conn.execute(_STATUS, {"p_id": order_id}).first()
    if row is None:
        return {"order_id": order_id, "status": "missing", "reason": None}
    return {
        "order_id": order_id,
        "status": row.status,
        "reason": row.reason,
        "already_settled": True,
    }


def _take_stock(conn: Connection, lines: list[tuple[int, int]], now: float) -> str | None:
    """Lines are (product_id, quantity) ordered by product id: the lock order."""
    taken: list[tuple[int, int]] = []
    for product_id, qty in lines:
        result = conn.execute(_TAKE_STOCK, {"p_id": product_id, "p_qty": qty, "p_now": now})
        if result.rowcount != 1:
            _put_back(conn, taken, now)
            return RejectReason.OUT_OF_STOCK.value
        taken.append((product_id, qty))
    return None


def _put_back(conn: Connection, lines: list[tuple[int, int]], now: float) -> None:
    for product_id, qty in lines:
        conn.execute(_PUT_BACK, {"p_id": product_id, "p_qty": qty, "p_now": now})


def _take_points(
    conn: Connection, user_id: int, points: int, order_id: int, now: float
) -> str | None:
    result = conn.execute(_TAKE_POINTS, {"p_user": user_id, "p_pts": points, "p_now": now})
    if result.rowcount != 1:
        return RejectReason.INSUFFICIENT_POINTS.value
    conn.execute(
        _SPEND,
        {
            "user_id": user_id,
            "delta": -points,
            "kind": LedgerKind.SPEND.value,
            "order_id": order_id,
            "expires_at": None,
            "created_at": now,
        },
    )
    return None
