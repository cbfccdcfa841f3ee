"""An order's owner takes it back: a pending order is cancelled (nothing was taken), a paid
one refunded (its stock and points given back, with a ``refund`` ledger row). Both are one
transaction that claims the order by its status, so a retry, a concurrent request or the
settlement job racing it changes nothing twice: asking again answers the same order.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.service.domain.errors import NotFound, OrderNotCancellable
from tasklab.service.domain.models import (
    LedgerEntry,
    LedgerKind,
    Order,
    OrderItem,
    OrderStatus,
    PointAccount,
    Product,
)

_DONE = {OrderStatus.CANCELLED.value, OrderStatus.REFUNDED.value}


def take_back(conn: Connection, order_id: int, *, user_id: int, admin: bool) -> list[int]:
    """Cancel or refund ``order_id`` in ``conn``'s transaction; the product ids whose stock
    came back (empty for a cancel or a repeat)."""
    now = time.time()
    order = _order(conn, order_id, user_id=user_id, admin=admin)
    if order.status in _DONE:
        return []
    if _claim(conn, order_id, OrderStatus.PENDING, OrderStatus.CANCELLED, now):
        return []
    # Not pending (any more: the settlement may have just paid it)
    if not _claim(conn, order_id, OrderStatus.PAID, OrderStatus.REFUNDED, now):
        status = _order(conn, order_id, user_id=user_id, admin=admin).status
        if status in _DONE:
            return []  # a concurrent request did it
        raise OrderNotCancellable(order_id, status)
    lines = conn.execute(
        sa.select(OrderItem.product_id, sa.func.sum(OrderItem.quantity).label("qty"))
        .where(OrderItem.order_id == order_id)
        .group_by(OrderItem.product_id)
        .order_by(OrderItem.product_id)  # the settlement's lock order
    ).all()
    for line in lines:
        conn.execute(
            sa.update(Product)
            .where(Product.id == line.product_id)
            .values(stock=Product.stock + line.qty, updated_at=now)
        )
    if order.use_points:
        _refund_points(conn, order.user_id, order.use_points, order_id, now)
    return [line.product_id for line in lines]


def _claim(
    conn: Connection, order_id: int, before: OrderStatus, after: OrderStatus, now: float
) -> bool:
    done = conn.execute(
        sa.update(Order)
        .where(Order.id == order_id, Order.status == before.value)
        .values(status=after.value, updated_at=now)
    )
    return done.rowcount == 1


def _order(conn: Connection, order_id: int, *, user_id: int, admin: bool) -> Any:
    stmt = sa.select(Order.status, Order.user_id, Order.use_points).where(Order.id == order_id)
    if not admin:
        stmt = stmt.where(Order.user_id == user_id)
    row = conn.execute(stmt).first()
    if row is None:
        raise NotFound("order", order_id)
    return row


def _refund_points(conn: Connection, user_id: int, points: int, order_id: int, now: float) -> None:
    conn.execute(
        sa.update(PointAccount)
        .where(PointAccount.user_id == user_id)
        .values(balance=PointAccount.balance + points, updated_at=now)
    )
    conn.execute(
        sa.insert(LedgerEntry).values(
            user_id=user_id,
            delta=points,
            kind=LedgerKind.REFUND.value,
            order_id=order_id,
            expires_at=None,
            created_at=now,
        )
    )
