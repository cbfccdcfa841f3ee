"""SQLAlchemy models of the shop (users, points, products, orders) and of data sync.

Times are epoch seconds (floats), as in the job records; the API renders them as ISO 8601.
Money is in integer cents; one point is worth one cent. Migration ``0002_shop`` creates
these tables with the indexes the API's queries use (noted on each index).
"""

from __future__ import annotations

import enum
from typing import cast

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    metadata = sa.MetaData()
    # Times are epoch-second floats, as in the migration (SQLAlchemy 2.1 would pick Double).
    type_annotation_map = {float: sa.Float}


class OrderStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    REJECTED = "rejected"
    CANCELLED = "cancelled"  # by its owner while pending: nothing was taken
    REFUNDED = "refunded"  # by its owner once paid: stock and points given back


class RejectReason(enum.StrEnum):
    OUT_OF_STOCK = "out_of_stock"
    INSUFFICIENT_POINTS = "insufficient_points"
    # Its settlement job ended DEAD or CANCELLED (tasklab.service.domain.settlement.gave_up):
    # nothing was taken. Retrying that job may still settle the order.
    SETTLEMENT_FAILED = "settlement_failed"


class LedgerKind(enum.StrEnum):
    GRANT = "grant"
    SPEND = "spend"
    REFUND = "refund"  # a refunded order's points, back (order_id set)
    EXPIRE = "expire"  # what was left of grants past their expiry (expires_at: theirs)


class User(Base):
    __tablename__ = "shop_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    # sha256 of the token's secret part; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(sa.String(64))
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    created_at: Mapped[float]
    # Unix time after which the token is refused (None: it does not expire).
    token_expires_at: Mapped[float | None]


class PointAccount(Base):
    """The balance, updated only by conditional UPDATEs next to a ledger row."""

    __tablename__ = "shop_point_accounts"
    __table_args__ = (
        sa.CheckConstraint("balance >= 0", name="ck_shop_point_accounts_balance_nonnegative"),
    )

    user_id: Mapped[int] = mapped_column(sa.ForeignKey("shop_users.id"), primary_key=True)
    balance: Mapped[int]
    updated_at: Mapped[float]


class LedgerEntry(Base):
    __tablename__ = "shop_points_ledger"
    __table_args__ = (
        # history, newest first: WHERE user_id = ? ORDER BY id DESC
        sa.Index("ix_shop_points_ledger_user_id", "user_id", "id"),
        # expiring grants: WHERE user_id = ? AND expires_at BETWEEN ? AND ?
        sa.Index("ix_shop_points_ledger_user_expires", "user_id", "expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("shop_users.id"))
    delta: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16))
    order_id: Mapped[int | None] = mapped_column(sa.ForeignKey("shop_orders.id"), index=True)
    expires_at: Mapped[float | None]
    created_at: Mapped[float]


class Product(Base):
    __tablename__ = "shop_products"
    __table_args__ = (
        sa.CheckConstraint("stock >= 0", name="ck_shop_products_stock_nonnegative"),
        # listing by category, sorted by price or by name
        sa.Index("ix_shop_products_category_price", "category", "price_cents"),
        sa.Index("ix_shop_products_category_name", "category", "name"),
        sa.Index("ix_shop_products_price", "price_cents"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    category: Mapped[str] = mapped_column(sa.String(64))
    price_cents: Mapped[int]
    stock: Mapped[int]
    # What was put on the shelf: initial_stock - sold (paid order items) == stock, always.
    initial_stock: Mapped[int]
    updated_at: Mapped[float]


class Order(Base):
    __tablename__ = "shop_orders"
    __table_args__ = (
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_shop_orders_user_idem"),
        # own orders newest first, optionally by status
        sa.Index("ix_shop_orders_user_id", "user_id", "id"),
        sa.Index("ix_shop_orders_user_status", "user_id", "status", "id"),
        # the invariant check: pending orders by age
        sa.Index("ix_shop_orders_status_created", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("shop_users.id"))
    status: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.String(32))
    use_points: Mapped[int]
    total_cents: Mapped[int]
    job_id: Mapped[str | None] = mapped_column(sa.String(32))
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(128))
    # sha256 of the request body, to refuse a reused key with a different body
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[float]
    updated_at: Mapped[float]


class OrderItem(Base):
    __tablename__ = "shop_order_items"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("shop_orders.id"), index=True)
    product_id: Mapped[int] = mapped_column(sa.ForeignKey("shop_products.id"), index=True)
    quantity: Mapped[int]
    unit_price_cents: Mapped[int]


class SyncFile(Base):
    """A sample partner file (CSV or JSON) under ``home_dir``; path is relative to it."""

    __tablename__ = "sync_files"
    __table_args__ = (sa.UniqueConstraint("platform", "name", name="uq_sync_files_platform_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[str] = mapped_column(sa.String(32))
    name: Mapped[str] = mapped_column(sa.String(200))
    path: Mapped[str] = mapped_column(sa.String(500))
    format: Mapped[str] = mapped_column(sa.String(8))
    created_at: Mapped[float]
    last_synced_at: Mapped[float | None]
    last_job_id: Mapped[str | None] = mapped_column(sa.String(32))


class SyncRecord(Base):
    """One good row of a synced file; re-syncing a file replaces its rows."""

    __tablename__ = "sync_records"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    file_id: Mapped[int] = mapped_column(sa.ForeignKey("sync_files.id"), index=True)
    platform: Mapped[str] = mapped_column(sa.String(32))
    external_id: Mapped[str] = mapped_column(sa.String(64))
    sku: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(200))
    price_cents: Mapped[int]
    quantity: Mapped[int]
    synced_at: Mapped[float]


class SyncRowError(Base):
    """A row of a synced file that could not be parsed: recorded, never a crash."""

    __tablename__ = "sync_row_errors"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    file_id: Mapped[int] = mapped_column(sa.ForeignKey("sync_files.id"), index=True)
    job_id: Mapped[str] = mapped_column(sa.String(32))
    line: Mapped[int]
    error: Mapped[str] = mapped_column(sa.String(500))
    created_at: Mapped[float]


SHOP_TABLES = (
    SyncRowError,
    SyncRecord,
    SyncFile,
    LedgerEntry,
    OrderItem,
    Order,
    PointAccount,
    Product,
    User,
)  # children first: the order to delete in


def table(model: type[Base]) -> sa.Table:
    """The Core table of a mapped class, for hot statements built once at import: building
    an ORM statement per call costs more than running it."""
    return cast(sa.Table, model.__table__)
