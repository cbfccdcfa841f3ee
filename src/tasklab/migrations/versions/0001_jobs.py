"""Job records.

Revision ID: 0001_jobs
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_jobs"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasklab_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("kwargs", sa.JSON, nullable=False),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False, server_default=""),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("next_attempt_at", sa.Float, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("progress_current", sa.Integer, nullable=True),
        sa.Column("progress_total", sa.Integer, nullable=True),
        sa.Column("progress_message", sa.String(500), nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("via", sa.String(8), nullable=False, server_default="broker"),
        sa.Column("message_id", sa.String(64), nullable=True),
        sa.Column("publish_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("queued_at", sa.Float, nullable=True),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_tasklab_jobs_owner_idem"),
    )
    # The reaper scans by status and time; the API lists by owner, newest first.
    op.create_index("ix_tasklab_jobs_status_queued", "tasklab_jobs", ["status", "queued_at"])
    op.create_index("ix_tasklab_jobs_status_lease", "tasklab_jobs", ["status", "lease_expires_at"])
    op.create_index("ix_tasklab_jobs_owner_created", "tasklab_jobs", ["owner", "created_at"])
    op.create_index("ix_tasklab_jobs_task_status", "tasklab_jobs", ["task", "status"])
    op.create_index("ix_tasklab_jobs_finished", "tasklab_jobs", ["finished_at"])
    # Effects written by the lab's probe jobs through job.transaction(): the drills count
    # rows per job here to prove effects happened exactly once.
    op.create_table(
        "tasklab_effects",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), nullable=False, index=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tasklab_effects")
    op.drop_table("tasklab_jobs")
