"""Console: indexes its job listings page by, and the log of operators' actions.

Revision ID: 0005_console
Revises: 0004_shop_integrity
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_console"
down_revision = "0004_shop_integrity"  # after the shop integrity migration
branch_labels = None
depends_on = None
ERROR_KEY_SQL = "substr(coalesce(error, ''), 1, 120)"  # as in tasklab.service.console.data


def upgrade() -> None:
    # The console lists jobs newest first by the key (created_at, id), alone or filtered by
    # status or task; (owner, created_at) exists already. A queue filter walks the first.
    op.create_index("ix_tasklab_jobs_created", "tasklab_jobs", ["created_at", "id"])
    op.create_index("ix_tasklab_jobs_status_created", "tasklab_jobs", ["status", "created_at"])
    op.create_index("ix_tasklab_jobs_task_created", "tasklab_jobs", ["task", "created_at"])
    # Dead letters group by task and the error's first characters, read from an index alone:
    # a generated column holds that key (PostgreSQL cannot answer an expression index from
    # the index alone). Stored on PostgreSQL (rewrites the table once: ~30 s per million
    # rows here); virtual on SQLite, whose ALTER TABLE adds no stored column.
    stored = "STORED" if op.get_context().dialect.name == "postgresql" else "VIRTUAL"
    op.execute(
        "ALTER TABLE tasklab_jobs ADD COLUMN error_key varchar(120) "
        f"GENERATED ALWAYS AS ({ERROR_KEY_SQL}) {stored}"
    )
    op.create_index(
        "ix_tasklab_jobs_status_task_error", "tasklab_jobs", ["status", "task", "error_key"]
    )
    op.create_table(
        "tasklab_console_actions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False, index=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(500), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("tasklab_console_actions")
    op.drop_index("ix_tasklab_jobs_status_task_error", "tasklab_jobs")
    op.execute("ALTER TABLE tasklab_jobs DROP COLUMN error_key")
    op.drop_index("ix_tasklab_jobs_task_created", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_status_created", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_created", "tasklab_jobs")
