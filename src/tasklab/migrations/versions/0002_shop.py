"""Reference service: shop (users, points, products, orders) and data sync.

Revision ID: 0002_shop
Revises: 0001_jobs
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_shop"
down_revision = "0001_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _shop()
    _sync()


def _shop() -> None:
    op.create_table(
        "shop_users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "shop_products",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("category", sa.String(64), nullable=False),
        sa.Column("price_cents", sa.Integer, nullable=False),
        sa.Column("stock", sa.Integer, nullable=False),
        sa.Column("initial_stock", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.CheckConstraint("stock >= 0", name="ck_shop_products_stock_nonnegative"),
    )
    op.create_index("ix_shop_products_category_price", "shop_products", ["category", "price_cents"])
    op.create_index("ix_shop_products_category_name", "shop_products", ["category", "name"])
    op.create_index("ix_shop_products_price", "shop_products", ["price_cents"])
    op.create_table(
        "shop_orders",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("shop_users.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("use_points", sa.Integer, nullable=False),
        sa.Column("total_cents", sa.Integer, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_shop_orders_user_idem"),
    )
    op.create_index("ix_shop_orders_user_id", "shop_orders", ["user_id", "id"])
    op.create_index("ix_shop_orders_user_status", "shop_orders", ["user_id", "status", "id"])
    op.create_index("ix_shop_orders_status_created", "shop_orders", ["status", "created_at"])
    op.create_table(
        "shop_order_items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.Integer, sa.ForeignKey("shop_orders.id"), nullable=False),
        sa.Column("product_id", sa.Integer, sa.ForeignKey("shop_products.id"), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("unit_price_cents", sa.Integer, nullable=False),
    )
    op.create_index("ix_shop_order_items_order_id", "shop_order_items", ["order_id"])
    op.create_index("ix_shop_order_items_product_id", "shop_order_items", ["product_id"])
    op.create_table(
        "shop_point_accounts",
        sa.Column("user_id", sa.Integer, sa.ForeignKey("shop_users.id"), primary_key=True),
        sa.Column("balance", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "shop_points_ledger",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("shop_users.id"), nullable=False),
        sa.Column("delta", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("order_id", sa.Integer, sa.ForeignKey("shop_orders.id"), nullable=True),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_shop_points_ledger_user_id", "shop_points_ledger", ["user_id", "id"])
    op.create_index(
        "ix_shop_points_ledger_user_expires", "shop_points_ledger", ["user_id", "expires_at"]
    )
    op.create_index("ix_shop_points_ledger_order_id", "shop_points_ledger", ["order_id"])


def _sync() -> None:
    op.create_table(
        "sync_files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_synced_at", sa.Float, nullable=True),
        sa.Column("last_job_id", sa.String(32), nullable=True),
        sa.UniqueConstraint("platform", "name", name="uq_sync_files_platform_name"),
    )
    op.create_table(
        "sync_records",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("file_id", sa.Integer, sa.ForeignKey("sync_files.id"), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("external_id", sa.String(64), nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("price_cents", sa.Integer, nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("synced_at", sa.Float, nullable=False),
    )
    op.create_index("ix_sync_records_file_id", "sync_records", ["file_id"])
    op.create_table(
        "sync_row_errors",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("file_id", sa.Integer, sa.ForeignKey("sync_files.id"), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("error", sa.String(500), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_sync_row_errors_file_id", "sync_row_errors", ["file_id"])


def downgrade() -> None:
    for table in (
        "sync_row_errors",
        "sync_records",
        "sync_files",
        "shop_points_ledger",
        "shop_point_accounts",
        "shop_order_items",
        "shop_orders",
        "shop_products",
        "shop_users",
    ):
        op.drop_table(table)
