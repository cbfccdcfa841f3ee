"""The durable job record: SQL table, statuses and the ``Job`` value returned by the API."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
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

# The predicates of migration 0008's partial indexes: each holds only the rows it names, so a
# job's status changes touch one or two small indexes instead of every (status, ...) one. A
# query reaches one by carrying the same predicate, literally: SQLite matches terms, not their
# meaning, and a bound parameter hides the value from PostgreSQL's generic plans.
WAITING_SQL = "status IN ('PENDING', 'QUEUED', 'RETRYING')"
CARRIED_SQL = "status IN ('QUEUED', 'RETRYING')"  # a message carries them (or should)
RUNNING_SQL = "status = 'STARTED'"
ENDED_BADLY_SQL = "status IN ('DEAD', 'CANCELLED')"


def waiting_rows() -> sa.TextClause:
    return sa.text(WAITING_SQL)


def carried_rows() -> sa.TextClause:
    return sa.text(CARRIED_SQL)


def running_rows() -> sa.TextClause:
    return sa.text(RUNNING_SQL)


def ended_badly_rows() -> sa.TextClause:
    return sa.text(ENDED_BADLY_SQL)


ALL_JOBS = "*"  # the row of count_by_status() that counts every job


def count_by_status() -> sa.CompoundSelect[Any]:
    """(status, jobs) from the partial indexes, for each status but SUCCEEDED, and (ALL_JOBS,
    every job) from the smallest index: status_counts() makes a dict of them. No index leads
    with status for all rows any more (migration 0008)."""
    by_status = sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
    return sa.union_all(
        by_status.where(waiting_rows()),
        by_status.where(running_rows()),
        by_status.where(ended_badly_rows()),
        sa.select(sa.literal(ALL_JOBS), sa.func.count()).select_from(jobs),
    )


def status_counts(rows: Iterable[Sequence[Any]]) -> dict[str, int]:
    """count_by_status()'s rows as {status: jobs}, without statuses no job has."""
    counts = {str(status): int(n) for status, n in rows}
    every = counts.pop(ALL_JOBS, 0)
    counts[JobStatus.SUCCEEDED.value] = every - sum(counts.values())
    return {status: n for status, n in counts.items() if n > 0}


def index_predicate(status: str) -> sa.TextClause | None:
    """The partial index predicate a filter on ``status`` can add; None for SUCCEEDED (the
    most rows: a listing walks the (created_at, id) index instead)."""
    if status in CLAIMABLE:
        return waiting_rows()
    if status == JobStatus.STARTED:
        return running_rows()
    if status in (JobStatus.DEAD, JobStatus.CANCELLED):
        return ended_badly_rows()
    return None


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
