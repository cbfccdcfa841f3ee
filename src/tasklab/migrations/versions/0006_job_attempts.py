"""Jobs: the attempts that ended without success, kept for the console's job page.

Revision ID: 0006_job_attempts
Revises: 0005_console
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_job_attempts"
down_revision = "0005_console"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasklab_job_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("ran_on", sa.String(200)),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("traceback", sa.Text),
    )
    op.create_index("ix_tasklab_job_attempts_job_id", "tasklab_job_attempts", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_tasklab_job_attempts_job_id", table_name="tasklab_job_attempts")
    op.drop_table("tasklab_job_attempts")
