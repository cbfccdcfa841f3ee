"""Jobs: partial indexes by status, so a status change touches one small index, not three.

Revision ID: 0008_partial_status_indexes
Revises: 0007_dead_letter_index

A job changes status three or four times (PENDING, QUEUED, STARTED, SUCCEEDED). Each change
rewrote an entry in every index that leads with status: (status, queued_at), (status,
lease_expires_at) and (status, created_at), for rows that mostly end SUCCEEDED and are never
looked up by status again; PostgreSQL, which cannot update in place (HOT) when an indexed
column changes, paid it in every index. Each replacement holds only the rows its queries read:

- waiting (PENDING, QUEUED, RETRYING) by (status, created_at, id, queue): the reaper's
  stranded jobs, waiting counts per queue, the console's listing of a waiting status;
- carried (QUEUED, RETRYING) by queued_at: the reaper's jobs whose message may be lost;
- running (STARTED) by lease_expires_at: expired leases;
- ended badly (DEAD, CANCELLED) by (status, created_at, id): the console's listing of those.

A SUCCEEDED listing walks (created_at, id) from 0005. The queries name these predicates
literally (tasklab.jobs.records.WAITING_SQL and its siblings).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_partial_status_indexes"
down_revision = "0007_dead_letter_index"
branch_labels = None
depends_on = None
WAITING = "status IN ('PENDING', 'QUEUED', 'RETRYING')"
CARRIED = "status IN ('QUEUED', 'RETRYING')"
RUNNING = "status = 'STARTED'"
ENDED_BADLY = "status IN ('DEAD', 'CANCELLED')"


def _partial(name: str, columns: list[str], where: str) -> None:
    op.create_index(
        name,
        "tasklab_jobs",
        columns,
        sqlite_where=sa.text(where),
        postgresql_where=sa.text(where),
    )


def upgrade() -> None:
    _partial("ix_tasklab_jobs_waiting", ["status", "created_at", "id", "queue"], WAITING)
    _partial("ix_tasklab_jobs_carried", ["queued_at"], CARRIED)
    _partial("ix_tasklab_jobs_running_lease", ["lease_expires_at"], RUNNING)
    _partial("ix_tasklab_jobs_ended_badly", ["status", "created_at", "id"], ENDED_BADLY)
    op.drop_index("ix_tasklab_jobs_status_queued", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_status_lease", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_status_created", "tasklab_jobs")


def downgrade() -> None:
    op.create_index("ix_tasklab_jobs_status_created", "tasklab_jobs", ["status", "created_at"])
    op.create_index("ix_tasklab_jobs_status_lease", "tasklab_jobs", ["status", "lease_expires_at"])
    op.create_index("ix_tasklab_jobs_status_queued", "tasklab_jobs", ["status", "queued_at"])
    op.drop_index("ix_tasklab_jobs_ended_badly", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_running_lease", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_carried", "tasklab_jobs")
    op.drop_index("ix_tasklab_jobs_waiting", "tasklab_jobs")
