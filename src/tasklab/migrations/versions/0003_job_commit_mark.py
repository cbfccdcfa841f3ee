"""Jobs: the mark a job's own transaction commits with its effects.

Revision ID: 0003_job_commit_mark
Revises: 0002_shop
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_job_commit_mark"
down_revision = "0002_shop"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasklab_jobs") as batch:
        batch.add_column(sa.Column("committed_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasklab_jobs") as batch:
        batch.drop_column("committed_at")
