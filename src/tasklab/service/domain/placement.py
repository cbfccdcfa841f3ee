"""Recording new orders: the orders placed at the same time commit in one transaction.

A batch is what arrived while the previous batch was being written (``Coalescer``): one
write lock, one price lookup and four statements for the whole batch instead of per order.
An order that fails validation (unknown product, too many points) fails alone and writes
nothing; if the batch's transaction fails (a duplicate idempotency key that another process
committed meanwhile), each order is retried in a transaction of its own so that only the
culprit fails.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.coalesce import Coalescer
from tasklab.database import SqlRunner
from tasklab.jobs.prepared import PreparedJob
from tasklab.service.domain.catalog import prices_of
from tasklab.service.domain.errors import InvalidField
from tasklab.service.domain.models import Order, OrderItem, OrderStatus, table

_orders, _items = table(Order), table(OrderItem)
# Built once. Several rows with RETURNING in one statement ("insertmanyvalues"), the ids in
# the order of the parameters.
_INSERT_ORDERS = sa.insert(_orders).returning(_orders.c.id, sort_by_parameter_order=True)
_INSERT_ITEMS = sa.insert(_items)


@dataclass(frozen=True)
class Line:
    product_id: int
    quantity: int


@dataclass
class NewOrder:
    user_id: int
    lines: list[Line]
    use_points: int
    idempotency_key: str | None
    request_hash: str
    job: PreparedJob


class Placement:
    def __init__(self, sql: SqlRunner, *, max_batch: int = 64) -> None:
        self.sql = sql
        self._batches: Coalescer[NewOrder, int] = Coalescer(self._write, max_batch=max_batch)

    async def insert(self, order: NewOrder) -> int:
        """Commit the order, its items and its job (``order.job``, which gets the order id as
        its argument); return the order id. Raises InvalidField for a bad order."""
        return await self._batches.submit(order)

    async def _write(self, batch: list[NewOrder]) -> list[int | BaseException]:
        # Prices are read before the write transaction (which then holds SQLite's write
        # lock for less time): the price an order records is the one it was checked with.
        ids = {ln.product_id for order in batch for ln in order.lines}
        prices = await self.sql.read(lambda conn: prices_of(conn, ids))
        try:
            return await self.sql.write(lambda conn: insert_orders(conn, batch, prices))
        except Exception:
            if len(batch) == 1:
                raise
        outcomes: list[int | BaseException] = []
        for order in batch:
            try:
                alone = functools.partial(insert_orders, batch=[order], prices=prices)
                outcomes.extend(await self.sql.write(alone))
            except Exception as e:
                outcomes.append(e)
        return outcomes


def insert_orders(
    conn: Connection, batch: list[NewOrder], prices: dict[int, int]
) -> list[int | BaseException]:
    """Insert the valid orders of ``batch`` (``prices``: ``prices_of`` their products); one
    outcome per order: its id or its error."""
    outcomes: list[int | BaseException] = []
    valid: list[tuple[int, NewOrder, int]] = []  # (position, order, total)
    for order in batch:
        try:
            total = _checked_total(order, prices)
        except InvalidField as e:
            outcomes.append(e)
            continue
        valid.append((len(outcomes), order, total))
        outcomes.append(0)  # replaced by the id below
    if not valid:
        return outcomes
    now = time.time()
    ids = conn.execute(
        _INSERT_ORDERS,
        [
            {
                "user_id": order.user_id,
                "status": OrderStatus.PENDING.value,
                "reason": None,
                "use_points": order.use_points,
                "total_cents": total,
                "job_id": order.job.id,
                "idempotency_key": order.idempotency_key,
                "request_hash": order.request_hash,
                "created_at": now,
                "updated_at": now,
            }
            for _, order, total in valid
        ],
    ).scalars()
    items: list[dict[str, Any]] = []
    job_rows: list[dict[str, Any]] = []
    for (position, order, _), order_id in zip(valid, ids, strict=True):
        outcomes[position] = order_id
        items.extend(
            {
                "order_id": order_id,
                "product_id": ln.product_id,
                "quantity": ln.quantity,
                "unit_price_cents": prices[ln.product_id],
            }
            for ln in order.lines
        )
        order.job.values["args"] = [order_id]  # the order id is known only now
        job_rows.append(order.job.insert[1])
    conn.execute(_INSERT_ITEMS, items)
    conn.execute(valid[0][1].job.insert[0], job_rows)
    return outcomes


def _checked_total(order: NewOrder, prices: dict[int, int]) -> int:
    for i, ln in enumerate(order.lines):
        if ln.product_id not in prices:
            raise InvalidField(
                f"items.{i}.product_id", f"no product {ln.product_id}", kind="unknown_product"
            )
    total = sum(prices[ln.product_id] * ln.quantity for ln in order.lines)
    if order.use_points > total:
        raise InvalidField(
            "use_points", f"exceeds the order total ({total} points)", kind="too_many_points"
        )
    return total
