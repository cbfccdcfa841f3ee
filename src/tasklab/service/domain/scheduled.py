"""The shop's scheduled work, run by beat (``tasklab.worker.beat_schedule``) on the
``scheduled`` queue:

* ``expire_points``: each grant past its ``expires_at`` takes what is left of it off the
  balance, with an ``expire`` ledger row (``expires_at``: the grant's). Points already spent
  cannot expire, so what is taken is at most the balance (as ``GET /api/v1/points/expiring``
  shows). The row marks the grants of that user and instant as done: a run is idempotent.
* ``warm_hot_products``: the catalog entries of the products ordered most in the last hour go
  to Redis (``hot_product_items`` through ``tasklab.cache.warm_from``), so a cold cache after
  a deploy or a flush does not send the first wave of readers to the database.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa
from celery import shared_task
from sqlalchemy import Connection, Engine

from tasklab.service.domain.models import (
    LedgerEntry,
    LedgerKind,
    Order,
    OrderItem,
    PointAccount,
    table,
)
from tasklab.settings import Settings

log = logging.getLogger("tasklab.service.scheduled")
EXPIRE_POINTS_TASK = "tasklab.shop.expire_points"
WARM_HOT_PRODUCTS_TASK = "tasklab.shop.warm_hot_products"
EXPIRE_EVERY_S = 300.0
WARM_EVERY_S = 600.0
HOT_PRODUCTS = 200
HOT_WINDOW_S = 3600.0
SCHEDULED_QUEUE = "scheduled"


def beat_entries() -> dict[str, Any]:
    """Entries to merge into ``beat_schedule``; a run that expired waiting is dropped."""
    return {
        name.rsplit(".", 1)[-1].replace("_", "-"): {
            "task": name,
            "schedule": every_s,
            "options": {"queue": SCHEDULED_QUEUE, "expires": every_s},
        }
        for name, every_s in (
            (EXPIRE_POINTS_TASK, EXPIRE_EVERY_S),
            (WARM_HOT_PRODUCTS_TASK, WARM_EVERY_S),
        )
    }


# --- points expiry ---------------------------------------------------------------------------


def _due_grants(now: float) -> sa.Select[Any]:
    """(user_id, expires_at, points) of grants past expiry with no ``expire`` row yet."""
    ledger = table(LedgerEntry)
    grant, expired = ledger.alias("g"), ledger.alias("e")
    done = sa.select(expired.c.id).where(
        expired.c.kind == LedgerKind.EXPIRE.value,
        expired.c.user_id == grant.c.user_id,
        expired.c.expires_at == grant.c.expires_at,
    )
    return (
        sa.select(grant.c.user_id, grant.c.expires_at, sa.func.sum(grant.c.delta).label("points"))
        .where(
            grant.c.kind == LedgerKind.GRANT.value,
            grant.c.expires_at.is_not(None),
            grant.c.expires_at <= now,
            ~sa.exists(done),
        )
        .group_by(grant.c.user_id, grant.c.expires_at)
        .order_by(grant.c.expires_at)
    )


def expire_points(engine: Engine, *, now: float | None = None) -> int:
    """Expire every grant due at ``now``; returns the points taken off balances."""
    now = time.time() if now is None else now
    with engine.connect() as conn:
        due = conn.execute(_due_grants(now)).all()
    taken = 0
    for row in due:
        with engine.connect() as conn:
            taken += _expire_one(conn, row.user_id, row.expires_at, int(row.points), now)
    if due:
        log.info("points expiry: %d grant group(s), %d points taken", len(due), taken)
    return taken


def _expire_one(conn: Connection, user_id: int, expires_at: float, points: int, now: float) -> int:
    """One transaction: the balance by compare-and-set, and the ``expire`` row."""
    balance = conn.execute(
        sa.select(PointAccount.balance).where(PointAccount.user_id == user_id)
    ).scalar_one_or_none()
    if balance is None:
        conn.rollback()
        return 0
    amount = min(points, int(balance))
    # A settlement spending meanwhile makes the update miss: nothing is written, and the
    # next run expires the grant then.
    changed = conn.execute(
        sa.update(PointAccount)
        .where(PointAccount.user_id == user_id, PointAccount.balance == balance)
        .values(balance=PointAccount.balance - amount, updated_at=now)
    )
    if changed.rowcount != 1:
        conn.rollback()
        return 0
    conn.execute(
        sa.insert(LedgerEntry).values(
            user_id=user_id,
            delta=-amount,
            kind=LedgerKind.EXPIRE.value,
            order_id=None,
            expires_at=expires_at,
            created_at=now,
        )
    )
    conn.commit()
    return amount


# --- hot products ------------------------------------------------------------------------------


def hot_product_items(
    conn: Connection,
    *,
    limit: int = HOT_PRODUCTS,
    window_s: float = HOT_WINDOW_S,
    now: float | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``(detail key, cached product)`` for the ``limit`` products ordered most (by quantity)
    in the last ``window_s``, hottest first."""
    from tasklab.service.domain.catalog import _COLUMNS, static_dict
    from tasklab.service.domain.catalog_cache import detail_key
    from tasklab.service.domain.models import Product

    now = time.time() if now is None else now
    hot = (
        sa.select(OrderItem.product_id, sa.func.sum(OrderItem.quantity).label("n"))
        .join(Order, Order.id == OrderItem.order_id)
        .where(Order.created_at >= now - window_s)
        .group_by(OrderItem.product_id)
        .order_by(sa.func.sum(OrderItem.quantity).desc(), OrderItem.product_id)
        .limit(limit)
        .subquery()
    )
    rows = conn.execute(
        sa.select(*_COLUMNS)
        .join(hot, hot.c.product_id == Product.id)
        .order_by(hot.c.n.desc(), Product.id)
    ).all()
    return [(detail_key(r.id), static_dict(r)) for r in rows]


def warm_hot_products_now(settings: Settings, engine: Engine) -> dict[str, Any]:
    from tasklab.cache import warm_from
    from tasklab.service.domain.catalog_cache import TTL_S, CatalogCache

    cache = CatalogCache.for_settings(settings, l1=False)
    if cache is None:
        return {"cache": None, "keys": 0, "duration_s": 0.0}
    try:
        with engine.connect() as conn:
            items = hot_product_items(conn)
        return warm_from(cache.cache, lambda: items, ttl_s=TTL_S).as_dict()
    finally:
        cache.close()


# --- the tasks ------------------------------------------------------------------------------------


# Celery's decorator is untyped; the job layer's worker runtime holds the settings and the
# engine of this worker process.
@shared_task(name=EXPIRE_POINTS_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def expire_points_task(self: Any) -> int:
    from tasklab.jobs.worker_side import runtime

    return expire_points(runtime(self.app).engine)


@shared_task(name=WARM_HOT_PRODUCTS_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def warm_hot_products(self: Any) -> dict[str, Any]:
    from tasklab.jobs.worker_side import runtime

    rt = runtime(self.app)
    return warm_hot_products_now(rt.settings, rt.engine)
