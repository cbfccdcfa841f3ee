"""Placing and reading orders (API side). Settlement runs in a worker: see ``settlement``.

``place`` records the order as ``pending`` and submits ``tasklab.shop.process_order``; it never
touches stock or points. An ``Idempotency-Key`` makes a retried request return the first order.
``take_back`` cancels a pending order (and then its settlement job) or refunds a paid one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from tasklab.database import SqlRunner
from tasklab.errors import JobNotFound, JobStateError, TasklabError
from tasklab.jobs import JobManager
from tasklab.service.domain.catalog_cache import invalidate_stock_now
from tasklab.service.domain.errors import IdempotencyConflict, NotFound, QuotaExceeded
from tasklab.service.domain.jobs import process_order
from tasklab.service.domain.lifecycle import take_back
from tasklab.service.domain.models import Order, OrderItem, OrderStatus
from tasklab.service.domain.paging import Page, at, money, offset_of
from tasklab.service.domain.placement import Line, NewOrder, Placement

log = logging.getLogger("tasklab.shop")


@dataclass(frozen=True)
class Placed:
    order_id: int
    job_id: str | None
    status: str
    replayed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "job_id": self.job_id, "status": self.status}


_ORDER_COLUMNS = (
    Order.id,
    Order.user_id,
    Order.status,
    Order.reason,
    Order.use_points,
    Order.total_cents,
    Order.job_id,
    Order.created_at,
    Order.updated_at,
)


def owner_of(user_id: int) -> str:
    """The job owner string for a user: jobs are listed and checked by it."""
    return f"user:{user_id}"


def request_hash(lines: list[Line], use_points: int) -> str:
    body = orjson.dumps(
        {"items": [[ln.product_id, ln.quantity] for ln in lines], "use_points": use_points}
    )
    return hashlib.sha256(body).hexdigest()


class Orders:
    def __init__(self, sql: SqlRunner, jobs: JobManager, *, in_flight_max: int = 50) -> None:
        self.sql = sql
        self.jobs = jobs
        self.in_flight_max = in_flight_max
        self._placement = Placement(sql)

    # --- place ------------------------------------------------------------------------------
    async def place(
        self,
        user_id: int,
        lines: list[Line],
        *,
        use_points: int,
        idempotency_key: str | None = None,
    ) -> Placed:
        digest = request_hash(lines, use_points)
        if idempotency_key is not None:
            existing = await self._by_key(user_id, idempotency_key)
            if existing is not None:
                return await self._replay(existing, digest)
        await self._check_quota(user_id)
        # The order, its items and its settlement job commit in one transaction (shared
        # with the orders placed meanwhile: see placement): an order that exists always has
        # a job, and the job is published once the commit is done.
        job = self.jobs.prepare(process_order, 0, owner=owner_of(user_id))
        order = NewOrder(user_id, lines, use_points, idempotency_key, digest, job)
        try:
            order_id = await self._placement.insert(order)
        except IntegrityError:
            existing = (
                await self._by_key(user_id, idempotency_key)
                if idempotency_key is not None
                else None
            )
            if existing is None:
                raise
            return await self._replay(existing, digest)
        await self.jobs.adispatch(job)
        return Placed(order_id, job.id, OrderStatus.PENDING.value)

    async def _check_quota(self, user_id: int) -> None:
        """At most ``in_flight_max`` pending orders per user (counted on the index of own
        orders by status; a race past it by a few concurrent requests is harmless)."""
        stmt = (
            sa.select(sa.func.count())
            .select_from(Order)
            .where(Order.user_id == user_id, Order.status == OrderStatus.PENDING.value)
        )
        pending = int(await self.sql.read(lambda conn: conn.execute(stmt).scalar_one()))
        if pending >= self.in_flight_max:
            raise QuotaExceeded(
                f"{pending} of your orders are still pending (the most is {self.in_flight_max}):"
                " wait until they are settled"
            )

    async def take_back(
        self, order_id: int, *, user_id: int, admin: bool = False
    ) -> dict[str, Any]:
        """Cancel a pending order or refund a paid one (idempotent); the order as it is now.
        A cancelled order's settlement job is cancelled too (asking again retries that)."""
        restocked = await self.sql.write(
            lambda conn: take_back(conn, order_id, user_id=user_id, admin=admin)
        )
        invalidate_stock_now(restocked)
        order = await self.get(order_id, user_id=user_id, admin=admin)
        if order["status"] == OrderStatus.CANCELLED.value and order["job_id"]:
            await self._cancel_settlement(str(order["job_id"]))
        return order

    async def _cancel_settlement(self, job_id: str) -> None:
        """Cancel a cancelled order's settlement job so that no worker runs it: at once if it
        waits, a request to stop if it runs (never terminated: its transaction decides).
        Only after the order's commit, so the job's give-up hook finds the order cancelled,
        not pending, and leaves it alone. The order's status stays the guard: a job already
        running or ended, or one this call misses, finds the order cancelled and takes nothing."""
        try:
            await asyncio.to_thread(self.jobs.cancel, job_id)
        except (JobStateError, JobNotFound):
            return  # ended already (a repeated cancel, or the settlement that lost the race)
        except TasklabError as e:  # the order is cancelled all the same
            log.warning("order's settlement job %s not cancelled: %s", job_id, e)

    async def _by_key(self, user_id: int, key: str) -> Any:
        stmt = sa.select(Order.id, Order.status, Order.job_id, Order.request_hash).where(
            Order.user_id == user_id, Order.idempotency_key == key
        )
        return await self.sql.read(lambda conn: conn.execute(stmt).first())

    async def _replay(self, row: Any, digest: str) -> Placed:
        if row.request_hash != digest:
            raise IdempotencyConflict("this Idempotency-Key was used for a different order request")
        # The order and its job were committed together, so the job exists (and is published
        # by the reaper if the first request died before publishing it).
        return Placed(row.id, row.job_id, row.status, replayed=True)

    # --- read -------------------------------------------------------------------------------
    async def get(self, order_id: int, *, user_id: int, admin: bool = False) -> dict[str, Any]:
        stmt = sa.select(*_ORDER_COLUMNS).where(Order.id == order_id)
        if not admin:
            stmt = stmt.where(Order.user_id == user_id)

        def order_and_items(conn: Connection) -> tuple[Any, Any]:
            row = conn.execute(stmt).first()
            return row, (_items_of(conn, [order_id]) if row is not None else None)

        row, items = await self.sql.read(order_and_items)
        if row is None:
            raise NotFound("order", order_id)
        return order_dict(row, items[order_id])

    async def page(
        self, user_id: int, *, page: int, page_size: int, status: str | None = None
    ) -> Page:
        """Own orders, newest first: three queries whatever the page size."""
        conds = [Order.user_id == user_id]
        if status is not None:
            conds.append(Order.status == status)
        rows_stmt = (
            sa.select(*_ORDER_COLUMNS)
            .where(*conds)
            .order_by(Order.id.desc())
            .limit(page_size)
            .offset(offset_of(page, page_size))
        )
        total_stmt = sa.select(sa.func.count()).select_from(Order).where(*conds)

        def page_of(conn: Connection) -> tuple[Any, Any, Any]:
            rows = conn.execute(rows_stmt).all()
            return (
                rows,
                _items_of(conn, [r.id for r in rows]),
                conn.execute(total_stmt).scalar_one(),
            )

        rows, items, total = await self.sql.read(page_of)
        return Page([order_dict(r, items[r.id]) for r in rows], page, page_size, int(total))


def _items_of(conn: Connection, order_ids: list[int]) -> defaultdict[int, list[dict[str, Any]]]:
    found: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
    if not order_ids:
        return found
    rows = conn.execute(
        sa.select(
            OrderItem.order_id, OrderItem.product_id, OrderItem.quantity, OrderItem.unit_price_cents
        )
        .where(OrderItem.order_id.in_(order_ids))
        .order_by(OrderItem.id)
    )
    for r in rows:
        found[r.order_id].append(
            {
                "product_id": r.product_id,
                "quantity": r.quantity,
                "unit_price": money(r.unit_price_cents),
            }
        )
    return found


def order_dict(row: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": row.id,
        "status": row.status,
        "reason": row.reason,
        "items": items,
        "use_points": row.use_points,
        "total": money(row.total_cents),
        "total_cents": row.total_cents,
        "job_id": row.job_id,
        "created_at": at(row.created_at),
        "updated_at": at(row.updated_at),
    }
