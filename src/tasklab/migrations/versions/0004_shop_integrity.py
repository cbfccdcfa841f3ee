"""Shop: balances never negative (CHECK), and bearer tokens that expire.

Revision ID: 0004_shop_integrity
Revises: 0003_job_commit_mark
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_shop_integrity"
down_revision = "0003_job_commit_mark"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite adds a CHECK by copying the table.
    with op.batch_alter_table("shop_point_accounts") as batch:
        batch.create_check_constraint("ck_shop_point_accounts_balance_nonnegative", "balance >= 0")
    with op.batch_alter_table("shop_users") as batch:
        batch.add_column(sa.Column("token_expires_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shop_users") as batch:
        batch.drop_column("token_expires_at")
    with op.batch_alter_table("shop_point_accounts") as batch:
        batch.drop_constraint("ck_shop_point_accounts_balance_nonnegative", type_="check")
