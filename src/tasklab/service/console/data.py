"""The console's SQL: job listings paged by key, dead letters by group, recent throughput,
and the action log. Plain functions of a ``Connection`` (run through ``SqlRunner``).

Listings never count or OFFSET: at millions of rows both walk the table. A page is the next
``limit`` rows after a cursor ``(created_at, id)``, newest first, which an index on
``(created_at, id)`` (or ``(status|task|owner, created_at)`` with that filter) answers by
reading ``limit`` entries (migration 0005).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.jobs.records import (
    Job,
    JobStatus,
    attempts,
    index_predicate,
    jobs,
    running_rows,
    waiting_rows,
)

PAGE_SIZE = 50
ERROR_KEY_CHARS = 120  # dead letters group by the error's first characters (ids differ after)
# How migration 0005's generated column error_key is computed.
ERROR_KEY_SQL = f"substr(coalesce(error, ''), 1, {ERROR_KEY_CHARS})"
GROUP_ACTION_MAX = 1000  # one group action touches at most this many jobs
SAMPLED_GROUPS = 25  # dead-letter groups shown with a few of their jobs; the rest by count

actions = sa.Table(
    "tasklab_console_actions",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(500), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("detail", sa.Text),
)


@dataclass(frozen=True)
class JobFilter:
    status: str | None = None
    task: str | None = None
    queue: str | None = None
    owner: str | None = None
    since: float | None = None  # created_at >= since (epoch seconds)
    until: float | None = None  # created_at < until

    def conditions(self) -> list[Any]:
        c = jobs.c
        conds: list[Any] = []
        for column, value in (
            (c.status, self.status),
            (c.task, self.task),
            (c.queue, self.queue),
            (c.owner, self.owner),
        ):
            if value:
                conds.append(column == value)
        if self.status and (predicate := index_predicate(self.status)) is not None:
            conds.append(predicate)
        if self.since is not None:
            conds.append(c.created_at >= self.since)
        if self.until is not None:
            conds.append(c.created_at < self.until)
        return conds


@dataclass(frozen=True)
class Cursor:
    """The last row of a page: the next page starts after it."""

    created_at: float
    id: str

    def encode(self) -> str:
        return f"{self.created_at!r}_{self.id}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Raises ValueError on a malformed cursor."""
        created, _, job_id = text.partition("_")
        if not job_id:
            raise ValueError("a cursor is <created_at>_<job id>")
        return cls(float(created), job_id)


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next: Cursor | None


def job_page_statement(where: JobFilter, *, after: Cursor | None, limit: int) -> sa.Select[Any]:
    c = jobs.c
    conds = where.conditions()
    created: Any = c.created_at
    if where.status == JobStatus.STARTED and not (where.task or where.owner):
        # The few running jobs (their partial index), sorted, rather than the newest million
        # walked for them: as an expression created_at cannot drive an ordered index walk,
        # which a planner without statistics (SQLite's) would otherwise prefer.
        created = c.created_at + 0
    if after is not None:
        conds.append(
            sa.or_(
                created < after.created_at,
                sa.and_(created == after.created_at, c.id < after.id),
            )
        )
    return sa.select(jobs).where(*conds).order_by(created.desc(), c.id.desc()).limit(limit)


def job_page(
    conn: Connection, where: JobFilter, *, after: Cursor | None = None, limit: int = PAGE_SIZE
) -> JobPage:
    # one more row than shown tells whether a next page exists
    stmt = job_page_statement(where, after=after, limit=limit + 1)
    found = [Job.from_row(r) for r in conn.execute(stmt)]
    more = len(found) > limit
    found = found[:limit]
    last = found[-1] if more and found else None
    return JobPage(found, Cursor(last.created_at, last.id) if last else None)


def get_job(conn: Connection, job_id: str) -> Job | None:
    row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    return Job.from_row(row) if row else None


def job_attempts(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    """The attempts of a job that ended without success, oldest first (its record holds the
    latest)."""
    stmt = sa.select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.id)
    return [dict(row._mapping) for row in conn.execute(stmt)]


# --- dead letters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadGroup:
    task: str
    error: str  # the first ERROR_KEY_CHARS characters
    count: int
    sample_ids: list[str]


def _dead() -> Any:
    """status = 'DEAD' with the literal in the SQL: the planners match it to the predicate of
    migration 0007's partial index (a bound parameter would not)."""
    return jobs.c.status == sa.literal_column(f"'{JobStatus.DEAD.value}'")


def _error_key() -> Any:
    """The generated column of migration 0005 (ERROR_KEY_SQL), indexed with task for DEAD jobs;
    not in ``records.jobs``: nothing writes it."""
    return sa.literal_column("tasklab_jobs.error_key")


def dead_groups(
    conn: Connection, *, limit: int = 100, sampled: int = SAMPLED_GROUPS
) -> list[DeadGroup]:
    """The largest ``limit`` groups, counted from the index alone (no table row visited);
    the first ``sampled`` with a few of their job ids (one query each)."""
    groups = []
    for n, (task, error, count) in enumerate(conn.execute(dead_groups_statement(limit)).all()):
        sample = (
            dead_ids(conn, task=task, error=error, limit=5, newest_first=False)
            if n < sampled
            else []
        )
        groups.append(DeadGroup(task, error, int(count), sample))
    return groups


def dead_groups_statement(limit: int) -> sa.Select[Any]:
    key = _error_key()
    return (
        sa.select(jobs.c.task, key, sa.func.count().label("n"))
        .where(_dead())
        .group_by(jobs.c.task, key)
        .order_by(sa.desc("n"))
        .limit(limit)
    )


def dead_ids(
    conn: Connection,
    *,
    task: str,
    error: str,
    limit: int = GROUP_ACTION_MAX,
    newest_first: bool = True,
) -> list[str]:
    """The group's jobs, newest first; without that order (a page's few samples) the scan
    stops at the first ``limit`` matches instead of sorting the whole group."""
    stmt = dead_ids_statement(task=task, error=error, limit=limit, newest_first=newest_first)
    return [str(i) for i in conn.execute(stmt).scalars()]


def dead_ids_statement(*, task: str, error: str, limit: int, newest_first: bool) -> sa.Select[Any]:
    stmt = sa.select(jobs.c.id).where(_dead(), jobs.c.task == task, _error_key() == error)
    if newest_first:
        stmt = stmt.order_by(jobs.c.finished_at.desc())
    return stmt.limit(limit)


def discard_dead(conn: Connection, job_ids: Sequence[str]) -> list[str]:
    """DEAD -> CANCELLED (out of the dead letters, kept as a record); the ids changed."""
    stmt = (
        jobs.update()
        .where(jobs.c.id.in_(list(job_ids)), jobs.c.status == JobStatus.DEAD.value)
        .values(status=JobStatus.CANCELLED.value, finished_at=time.time())
        .returning(jobs.c.id)
    )
    return [str(i) for i in conn.execute(stmt).scalars()]


# --- throughput ------------------------------------------------------------------------------


def finished_last_minute(conn: Connection, *, now: float) -> dict[str, dict[str, int]]:
    """queue -> {status: jobs finished in the last 60 s} (SUCCEEDED, DEAD, CANCELLED)."""
    stmt = (
        sa.select(jobs.c.queue, jobs.c.status, sa.func.count())
        .where(jobs.c.finished_at >= now - 60)
        .group_by(jobs.c.queue, jobs.c.status)
    )
    out: dict[str, dict[str, int]] = {}
    for queue, status, n in conn.execute(stmt):
        out.setdefault(str(queue), {})[str(status)] = int(n)
    return out


def throughput_per_minute(
    conn: Connection, *, now: float, minutes: int = 60
) -> dict[str, list[tuple[float, float]]]:
    """status -> [(minutes ago, jobs finished that minute)] over the last ``minutes``."""
    bucket = sa.cast((now - jobs.c.finished_at) / 60, sa.Integer).label("ago")
    stmt = (
        sa.select(bucket, jobs.c.status, sa.func.count())
        .where(jobs.c.finished_at >= now - minutes * 60)
        .group_by(bucket, jobs.c.status)
    )
    series: dict[str, dict[int, int]] = {}
    for ago, status, n in conn.execute(stmt):
        series.setdefault(str(status), {})[int(ago)] = int(n)
    return {
        status: [(-float(m), float(counts.get(m, 0))) for m in range(minutes - 1, -1, -1)]
        for status, counts in series.items()
    }


# --- the action log --------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    at: float
    actor: str
    action: str
    target: str
    count: int
    detail: str | None


def log_action(
    conn: Connection, *, actor: str, action: str, target: str, count: int, detail: str = ""
) -> None:
    conn.execute(
        actions.insert().values(
            at=time.time(),
            actor=actor,
            action=action,
            target=target[:500],
            count=count,
            detail=detail or None,
        )
    )


def recent_actions(conn: Connection, *, limit: int = 100) -> list[Action]:
    stmt = sa.select(actions).order_by(actions.c.at.desc(), actions.c.id.desc()).limit(limit)
    return [
        Action(r.at, r.actor, r.action, r.target, r._mapping["count"], r.detail)
        for r in conn.execute(stmt)
    ]


def running_locally(conn: Connection) -> int:
    """Jobs the API's local executor runs now (the breaker is open or was)."""
    stmt = sa.select(sa.func.count()).select_from(jobs).where(running_rows(), jobs.c.via == "local")
    return int(conn.execute(stmt).scalar_one())


def waiting_by_queue(conn: Connection) -> dict[str, int]:
    """Jobs waiting to start per queue, by their records: several may ride in one broker
    message (a bundle), so this is not the broker's depth."""
    stmt = sa.select(jobs.c.queue, sa.func.count()).where(waiting_rows()).group_by(jobs.c.queue)
    return {str(queue): int(n) for queue, n in conn.execute(stmt)}


WAIT_SAMPLE_ROWS = 2000  # the newest finished jobs the wait chart reads, at most


def queue_wait_per_minute(
    conn: Connection, *, now: float, minutes: int = 60
) -> dict[str, list[tuple[float, float]]]:
    """ "p50"/"p95" -> [(minutes ago, seconds from queued to started)] per minute, from the
    newest ``WAIT_SAMPLE_ROWS`` jobs finished in the last ``minutes``."""
    c = jobs.c
    stmt = (
        sa.select(c.finished_at, c.started_at - c.queued_at)
        .where(c.finished_at >= now - minutes * 60, c.started_at.is_not(None))
        .where(c.queued_at.is_not(None))
        .order_by(c.finished_at.desc())
        .limit(WAIT_SAMPLE_ROWS)
    )
    by_minute: dict[int, list[float]] = {}
    for finished, wait in conn.execute(stmt):
        by_minute.setdefault(int((now - finished) / 60), []).append(max(0.0, float(wait)))
    out: dict[str, list[tuple[float, float]]] = {"p50": [], "p95": []}
    for ago in sorted(by_minute, reverse=True):
        waits = sorted(by_minute[ago])
        out["p50"].append((-float(ago), waits[len(waits) // 2]))
        out["p95"].append((-float(ago), waits[min(len(waits) - 1, int(len(waits) * 0.95))]))
    return out
