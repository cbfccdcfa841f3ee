"""Jobs: fewer index writes per job (the dead letters' index holds DEAD jobs only; no
(task, status) index).

Revision ID: 0007_dead_letter_index
Revises: 0006_job_attempts

0005's (status, task, error_key) index took an entry for every job and a change at every
status change (submit, publish, claim, finish: ~7 index writes per job for a page that
reads DEAD jobs only). The same index, partial (WHERE status = 'DEAD'), is
touched only when a job dies or leaves the dead letters, and answers the same queries
(they name the status as a literal, which the planners need to match the predicate).
(task, status) from 0001 serves no query since 0005's (task, created_at) (a task's jobs,
with or without a status, newest first) and changed at every status change too.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_dead_letter_index"
down_revision = "0006_job_attempts"
branch_labels = None
depends_on = None
DEAD_ONLY = "status = 'DEAD'"


def upgrade() -> None:
    op.create_index(
        "ix_tasklab_jobs_dead_task_error",
        "tasklab_jobs",
        ["status", "task", "error_key"],
        sqlite_where=sa.text(DEAD_ONLY),
        postgresql_where=sa.text(DEAD_ONLY),
    )
    op.drop_index("ix_tasklab_jobs_status_task_error", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_task_status", "tasklab_jobs")


def downgrade() -> None:
    op.create_index("ix_tasklab_jobs_task_status", "tasklab_jobs", ["task", "status"])
    op.create_index(
        "ix_tasklab_jobs_status_task_error", "tasklab_jobs", ["status", "task", "error_key"]
    )
    op.drop_index("ix_tasklab_jobs_dead_task_error", "tasklab_jobs")
