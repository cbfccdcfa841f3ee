"""Settling an order inside the job's transaction: take stock, then points, or reject.

Every change is a conditional UPDATE (``stock >= :q``, ``balance >= :p``) whose row count says
whether it happened, so concurrent settlements never oversell nor overdraw, on SQLite (one
writer at a time) and on PostgreSQL (the row lock re-checks the condition after waiting). Rows
are touched in one order (products by id, then the account), so two settlements cannot
deadlock. A rejection is a normal outcome: what was taken is put back in the same transaction.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

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
)

_NO_SYNC = {"synchronize_session": False}


def settle_order(session: Session, order_id: int) -> dict[str, Any]:
    now = time.time()
    if not _claim(session, order_id, now):
        return _already_settled(session, order_id)
    order = session.execute(
        sa.select(Order.user_id, Order.use_points).where(Order.id == order_id)
    ).one()
    lines = _lines(session, order_id)
    reason = _take_stock(session, lines, now)
    if reason is None and order.use_points:
        reason = _take_points(session, order.user_id, order.use_points, order_id, now)
        if reason is not None:
            _put_back(session, lines, now)
    status = OrderStatus.PAID if reason is None else OrderStatus.REJECTED
    if status is OrderStatus.PAID:
        invalidate_after_commit(session, [product_id for product_id, _ in lines])
    session.execute(
        sa.update(Order)
        .where(Order.id == order_id)
        .values(status=status.value, reason=reason, updated_at=now),
        execution_options=_NO_SYNC,
    )
    return {"order_id": order_id, "status": status.value, "reason": reason}


def _claim(session: Session, order_id: int, now: float) -> bool:
    """Take the order's row (the first write: it also takes SQLite's write lock, and the row
    lock on PostgreSQL). False if it is no longer pending."""
    result = session.execute(
        sa.update(Order)
        .where(Order.id == order_id, Order.status == OrderStatus.PENDING.value)
        .values(updated_at=now),
        execution_options=_NO_SYNC,
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _already_settled(session: Session, order_id: int) -> dict[str, Any]:
    row = session.execute(sa.select(Order.status, Order.reason).where(Order.id == order_id)).first()
    if row is None:
        return {"order_id": order_id, "status": "missing", "reason": None}
    return {
        "order_id": order_id,
        "status": row.status,
        "reason": row.reason,
        "already_settled": True,
    }


def _lines(session: Session, order_id: int) -> list[tuple[int, int]]:
    """(product_id, quantity) per product, ordered by product id (the lock order)."""
    rows = session.execute(
        sa.select(OrderItem.product_id, sa.func.sum(OrderItem.quantity))
        .where(OrderItem.order_id == order_id)
        .group_by(OrderItem.product_id)
        .order_by(OrderItem.product_id)
    ).all()
    return [(int(pid), int(qty)) for pid, qty in rows]


def _take_stock(session: Session, lines: list[tuple[int, int]], now: float) -> str | None:
    taken: list[tuple[int, int]] = []
    for product_id, qty in lines:
        result = session.execute(
            sa.update(Product)
            .where(Product.id == product_id, Product.stock >= qty)
            .values(stock=Product.stock - qty, updated_at=now),
            execution_options=_NO_SYNC,
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            _put_back(session, taken, now)
            return RejectReason.OUT_OF_STOCK.value
        taken.append((product_id, qty))
    return None


def _put_back(session: Session, lines: list[tuple[int, int]], now: float) -> None:
    for product_id, qty in lines:
        session.execute(
            sa.update(Product)
            .where(Product.id == product_id)
            .values(stock=Product.stock + qty, updated_at=now),
            execution_options=_NO_SYNC,
        )


def _take_points(
    session: Session, user_id: int, points: int, order_id: int, now: float
) -> str | None:
    result = session.execute(
        sa.update(PointAccount)
        .where(PointAccount.user_id == user_id, PointAccount.balance >= points)
        .values(balance=PointAccount.balance - points, updated_at=now),
        execution_options=_NO_SYNC,
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return RejectReason.INSUFFICIENT_POINTS.value
    session.execute(
        sa.insert(LedgerEntry).values(
            user_id=user_id,
            delta=-points,
            kind=LedgerKind.SPEND.value,
            order_id=order_id,
            expires_at=None,
            created_at=now,
        )
    )
    return None
