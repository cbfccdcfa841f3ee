"""The durable job record: SQL table, statuses and the ``Job`` value returned by the API."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()

jobs = sa.Table(
    "tasklab_jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("kwargs", sa.JSON, nullable=False),
    sa.Column("queue", sa.String(64), nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("owner", sa.String(128), nullable=False, server_default=""),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("lease_owner", sa.String(200)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("progress_current", sa.Integer),
    sa.Column("progress_total", sa.Integer),
    sa.Column("progress_message", sa.String(500)),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("traceback", sa.Text),
    sa.Column("via", sa.String(8), nullable=False, server_default="broker"),
    sa.Column("message_id", sa.String(64)),
    sa.Column("publish_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("queued_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    # Set by a job's own transaction (job.transaction()) with its effects: the attempt's
    # effects are in, whatever happens to its worker before the completion is recorded.
    sa.Column("committed_at", sa.Float),
)

# Attempts that ended without success (failed, or their worker was lost): where each ran, how
# it ended, its error. A job's record holds its latest attempt; this keeps the earlier ones.
attempts = sa.Table(
    "tasklab_job_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # failed, lost
    sa.Column("ran_on", sa.String(200)),  # the lease owner: host:pid
    sa.Column("started_at", sa.Float),
    sa.Column("ended_at", sa.Float, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("traceback", sa.Text),
)

effects = sa.Table(
    "tasklab_effects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"  # durable, not (yet) accepted by the broker
    QUEUED = "QUEUED"  # published to the broker
    STARTED = "STARTED"  # claimed by a worker (or the local executor) under a lease
    RETRYING = "RETRYING"  # an attempt failed; the next one is scheduled
    SUCCEEDED = "SUCCEEDED"
    DEAD = "DEAD"  # attempts exhausted: tasklab's dead-letter queue
    CANCELLED = "CANCELLED"


FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED})
CLAIMABLE = (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RETRYING)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job record."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    priority: int
    owner: str
    idempotency_key: str | None
    status: JobStatus
    attempt: int
    max_attempts: int
    progress_current: int | None
    progress_total: int | None
    progress_message: str | None
    result: Any
    error: str | None
    traceback: str | None
    via: str
    message_id: str | None
    created_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    publish_count: int = 0

    @property
    def done(self) -> bool:
        return self.status in FINAL

    @classmethod
    def from_row(cls, row: Any) -> Job:
        m = row._mapping
        return cls(**{f: m[f] for f in _FIELDS if f != "status"}, status=JobStatus(m["status"]))

    def to_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in _FIELDS}
        out["status"] = self.status.value
        out["progress"] = {
            "current": self.progress_current,
            "total": self.progress_total,
            "message": self.progress_message,
        }
        return out


_FIELDS = tuple(f for f in Job.__dataclass_fields__)
