"""SQL statements on the jobs table. Every state change is one conditional UPDATE, so two
processes racing on the same job cannot both win (the claim, the fence on ``attempt``)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.sql import Executable
from sqlalchemy.sql.dml import Update

from tasklab.jobs.records import CLAIMABLE, FINAL, JobStatus, jobs

MAX_ERROR_CHARS = 4000
MAX_TRACEBACK_CHARS = 16000
# Hot-path statements are built once with bind parameters (named p_* so they never collide
# with column names) and executed as (statement, params): building SQLAlchemy constructs per
# call cost more than the SQL itself.
Prepared = tuple[Executable, dict[str, Any]]


_ASYNC_COMMIT = sa.text("SET LOCAL synchronous_commit = off")


def relax_commit(conn: Connection) -> None:
    """On PostgreSQL, let this transaction commit without waiting for its WAL flush.

    Only for writes whose loss is harmless: a claim (or lease renewal) lost in a crash leaves
    the job claimable again, and the attempt's completion - a normal synchronous commit -
    flushes the WAL up to and including the claim before it returns. Job inserts and
    completions never use it: they are the durable facts.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_ASYNC_COMMIT)


def new_job_id() -> str:
    return uuid.uuid4().hex


def _fenced(job_id: str, attempt: int) -> Update:
    return jobs.update().where(
        jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == JobStatus.STARTED.value
    )


def _fenced_p() -> Update:
    """The fence with bind parameters, for statements built once at import."""
    return jobs.update().where(
        jobs.c.id == sa.bindparam("p_id"),
        jobs.c.attempt == sa.bindparam("p_attempt"),
        jobs.c.status == JobStatus.STARTED.value,
    )


_INSERT = jobs.insert()


def insert_job(
    *,
    job_id: str,
    task: str,
    args: list[Any],
    kwargs: dict[str, Any],
    queue: str,
    priority: int,
    owner: str,
    idempotency_key: str | None,
    max_attempts: int,
    status: JobStatus,
    now: float,
    next_attempt_at: float | None = None,
    message_id: str | None = None,
) -> Prepared:
    queued = status is JobStatus.QUEUED
    return _INSERT, {
        "id": job_id,
        "task": task,
        "args": args,
        "kwargs": kwargs,
        "queue": queue,
        "priority": priority,
        "owner": owner,
        "idempotency_key": idempotency_key,
        "status": status.value,
        "attempt": 0,
        "max_attempts": max_attempts,
        "created_at": now,
        "queued_at": now if queued else None,
        "next_attempt_at": next_attempt_at,
        "message_id": message_id,
        "publish_count": 1 if queued else 0,
        "via": "broker",
        "cancel_requested": False,
    }


_SELECT = sa.select(jobs).where(jobs.c.id == sa.bindparam("p_id"))


def select_job(job_id: str) -> Prepared:
    return _SELECT, {"p_id": job_id}


def select_by_idempotency(owner: str, key: str) -> sa.Select[Any]:
    return sa.select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)


def select_page(
    *, owner: str | None, status: str | None, task: str | None, page: int, page_size: int
) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """(rows, total) statements for a listing, newest first."""
    conds = []
    if owner is not None:
        conds.append(jobs.c.owner == owner)
    if status is not None:
        conds.append(jobs.c.status == status)
    if task is not None:
        conds.append(jobs.c.task == task)
    rows = (
        sa.select(jobs)
        .where(*conds)
        .order_by(jobs.c.created_at.desc(), jobs.c.id)
        .limit(page_size)
        .offset((page - 1) * page_size)
    )
    total = sa.select(sa.func.count()).select_from(jobs).where(*conds)
    return rows, total


def mark_published(job_id: str, message_id: str, now: float) -> Update:
    """PENDING/QUEUED/RETRYING -> QUEUED after the broker accepted a message."""
    return (
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in CLAIMABLE]))
        .values(
            status=JobStatus.QUEUED.value,
            queued_at=now,
            message_id=message_id,
            via="broker",
            publish_count=jobs.c.publish_count + 1,
        )
    )


def mark_pending(job_id: str, via: str) -> Update:
    """The broker refused the message: the job waits in SQL (and maybe runs locally)."""
    return (
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in CLAIMABLE]))
        .values(status=JobStatus.PENDING.value, via=via)
    )


_CLAIM = (
    jobs.update()
    .where(
        jobs.c.id == sa.bindparam("p_id"),
        jobs.c.status.in_([st.value for st in CLAIMABLE]),
        jobs.c.cancel_requested == sa.false(),
    )
    .values(
        status=JobStatus.STARTED.value,
        attempt=jobs.c.attempt + 1,
        lease_owner=sa.bindparam("p_owner"),
        lease_expires_at=sa.bindparam("p_until"),
        started_at=sa.bindparam("p_now"),
        via=sa.bindparam("p_via"),
        next_attempt_at=None,
        # The message this attempt runs from (a bundle's, for a bundled job): the one that
        # cancel(terminate=True) revokes.
        message_id=sa.func.coalesce(sa.bindparam("p_message", type_=sa.String), jobs.c.message_id),
    )
    # What the executor needs to run the attempt, not the whole row (result, traceback).
    .returning(
        jobs.c.queue,
        jobs.c.attempt,
        jobs.c.max_attempts,
        jobs.c.args,
        jobs.c.kwargs,
        jobs.c.created_at,
        jobs.c.queued_at,
        jobs.c.started_at,
        jobs.c.next_attempt_at,
    )
)


def claim(
    job_id: str,
    *,
    lease_owner: str,
    lease_s: float,
    via: str,
    now: float,
    message_id: str | None = None,
) -> Prepared:
    """Take a job for one attempt. Only one caller can win; the row comes back if it did."""
    return _CLAIM, {
        "p_id": job_id,
        "p_message": message_id,
        "p_owner": lease_owner,
        "p_until": now + lease_s,
        "p_now": now,
        "p_via": via,
    }


_COMPLETE = _fenced_p().values(
    status=JobStatus.SUCCEEDED.value,
    result=sa.bindparam("p_result", type_=sa.JSON),
    finished_at=sa.bindparam("p_now"),
    lease_owner=None,
    lease_expires_at=None,
    progress_current=sa.func.coalesce(jobs.c.progress_total, jobs.c.progress_current),
)


def complete(job_id: str, attempt: int, *, result: Any, now: float) -> Prepared:
    return _COMPLETE, {"p_id": job_id, "p_attempt": attempt, "p_result": result, "p_now": now}


def fail(
    job_id: str, attempt: int, *, error: str, tb: str, retry_at: float | None, now: float
) -> Update:
    """An attempt raised: RETRYING with the next attempt's time, or DEAD."""
    values: dict[str, Any] = {
        "error": error[:MAX_ERROR_CHARS],
        "traceback": tb[-MAX_TRACEBACK_CHARS:],
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if retry_at is None:
        values.update(status=JobStatus.DEAD.value, finished_at=now)
    else:
        values.update(status=JobStatus.RETRYING.value, next_attempt_at=retry_at)
    return _fenced(job_id, attempt).values(**values)


def mark_cancelled_running(job_id: str, attempt: int, now: float) -> Update:
    return _fenced(job_id, attempt).values(
        status=JobStatus.CANCELLED.value, finished_at=now, lease_owner=None, lease_expires_at=None
    )


def cancel_waiting(job_id: str, now: float) -> Update:
    """A job that has not started is cancelled at once; its message is skipped on delivery."""
    return (
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in CLAIMABLE]))
        .values(status=JobStatus.CANCELLED.value, finished_at=now, cancel_requested=True)
    )


def request_cancel_running(job_id: str, *, now: float, terminate: bool) -> Update:
    """Ask a running job to stop (it checks at progress()); with terminate, mark it now."""
    stmt = jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.STARTED.value)
    if terminate:
        return stmt.values(
            cancel_requested=True,
            status=JobStatus.CANCELLED.value,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
    return stmt.values(cancel_requested=True)


_PROGRESS = (
    _fenced_p()
    .values(
        progress_current=sa.bindparam("p_current"),
        progress_total=sa.bindparam("p_total"),
        progress_message=sa.bindparam("p_message"),
        lease_expires_at=sa.bindparam("p_until"),
    )
    .returning(jobs.c.cancel_requested)
)


def progress(
    job_id: str,
    attempt: int,
    *,
    current: int,
    total: int | None,
    message: str | None,
    renew_until: float,
) -> Prepared:
    return _PROGRESS, {
        "p_id": job_id,
        "p_attempt": attempt,
        "p_current": current,
        "p_total": total,
        "p_message": None if message is None else message[:500],
        "p_until": renew_until,
    }


_RENEW = _fenced_p().values(lease_expires_at=sa.bindparam("p_until"))


def renew_lease(job_id: str, attempt: int, until: float) -> Prepared:
    return _RENEW, {"p_id": job_id, "p_attempt": attempt, "p_until": until}


def retry_dead(job_id: str, extra_attempts: int) -> Update:
    """Give a DEAD or CANCELLED job new attempts; the attempt counter keeps counting up, so
    a stale delivery of an old attempt stays fenced out."""
    return (
        jobs.update()
        .where(
            jobs.c.id == job_id,
            jobs.c.status.in_([JobStatus.DEAD.value, JobStatus.CANCELLED.value]),
        )
        .values(
            status=JobStatus.PENDING.value,
            max_attempts=jobs.c.attempt + extra_attempts,
            cancel_requested=False,
            finished_at=None,
            error=None,
            traceback=None,
            next_attempt_at=None,
        )
    )


# --- reaper queries ----------------------------------------------------------------------------


def expired_leases(now: float, limit: int) -> sa.Select[Any]:
    return (
        sa.select(
            jobs.c.id,
            jobs.c.task,
            jobs.c.queue,
            jobs.c.priority,
            jobs.c.attempt,
            jobs.c.max_attempts,
        )
        .where(jobs.c.status == JobStatus.STARTED.value, jobs.c.lease_expires_at < now)
        .limit(limit)
    )


def release_expired(job_id: str, attempt: int, now: float, *, dead: bool) -> Update:
    """Take back a job whose lease ran out (its worker died): QUEUE it again, or DEAD it."""
    stmt = jobs.update().where(
        jobs.c.id == job_id,
        jobs.c.attempt == attempt,
        jobs.c.status == JobStatus.STARTED.value,
        jobs.c.lease_expires_at < now,
    )
    if dead:
        return stmt.values(
            status=JobStatus.DEAD.value,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error="lease expired on the last attempt (worker lost)",
        )
    return stmt.values(
        status=JobStatus.PENDING.value,
        lease_owner=None,
        lease_expires_at=None,
        error="lease expired (worker lost); re-queued",
    )


def stranded(
    *, pending_before: float, queued_before: float, limit: int, queues: list[str] | None = None
) -> sa.Select[Any]:
    """Jobs that should be in the broker but may not be: PENDING past the grace period, or
    QUEUED/RETRYING (due) older than ``queued_before``."""
    due_retry = sa.and_(
        jobs.c.status == JobStatus.RETRYING.value, jobs.c.next_attempt_at < queued_before
    )
    old_queued = sa.and_(
        jobs.c.status == JobStatus.QUEUED.value,
        jobs.c.queued_at < queued_before,
        # a countdown message waits (reserved) in a worker until it is due
        sa.or_(jobs.c.next_attempt_at.is_(None), jobs.c.next_attempt_at < queued_before),
    )
    pending = sa.and_(jobs.c.status == JobStatus.PENDING.value, jobs.c.created_at < pending_before)
    conds: list[Any] = [sa.or_(pending, old_queued, due_retry)]
    if queues is not None:
        conds.append(sa.or_(pending, jobs.c.queue.in_(queues)))
    return (
        sa.select(
            jobs.c.id,
            jobs.c.task,
            jobs.c.queue,
            jobs.c.priority,
            jobs.c.status,
            jobs.c.next_attempt_at,
        )
        .where(*conds)
        .order_by(jobs.c.created_at)
        .limit(limit)
    )


def purge_finished(before: float) -> sa.Delete:
    return jobs.delete().where(
        jobs.c.status.in_([s.value for s in FINAL]), jobs.c.finished_at < before
    )


def count_by_status() -> sa.Select[Any]:
    return sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)


def now_s() -> float:
    return time.time()
