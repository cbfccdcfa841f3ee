"""SQL statements on the jobs table. Every state change is one conditional UPDATE, so two
processes racing on the same job cannot both win (the claim, the fence on ``attempt``)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.functions import FunctionElement

from tasklab.jobs.records import (
    CLAIMABLE,
    JobStatus,
    attempts,
    index_predicate,
    jobs,
)

MAX_ERROR_CHARS = 4000
MAX_TRACEBACK_CHARS = 16000
# Hot-path statements are built once with bind parameters (named p_* so they never collide
# with column names) and executed as (statement, params): building SQLAlchemy constructs per
# call cost more than the SQL itself.
Prepared = tuple[Executable, dict[str, Any]]


class db_now(FunctionElement[float]):
    """The database server's clock, in Unix seconds. Leases are set and compared with it, so
    that hosts whose clocks disagree still agree on when a lease runs out."""

    type = sa.Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _db_now_pg(_element: db_now, _compiler: SQLCompiler, **_kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now)
def _db_now_sqlite(_element: db_now, _compiler: SQLCompiler, **_kw: Any) -> str:
    # SQLite runs on the writer's host: its clock is that host's (julianday keeps the ms).
    return "((julianday('now') - 2440587.5) * 86400.0)"


def lease_until(lease_s: Any) -> Any:
    return db_now() + lease_s


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
# What a state change returns so that a job's give-up hook (JobSpec.on_give_up) can run in
# the same transaction when it ends DEAD or CANCELLED.
ENDED = (jobs.c.id, jobs.c.task, jobs.c.status, jobs.c.args, jobs.c.kwargs, jobs.c.error)


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
        "queued_at": None,
        "next_attempt_at": next_attempt_at,
        "message_id": message_id,
        "publish_count": 0,
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
    conds: list[Any] = []
    if owner is not None:
        conds.append(jobs.c.owner == owner)
    if status is not None:
        conds.append(jobs.c.status == status)
        if (predicate := index_predicate(status)) is not None:
            conds.append(predicate)
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


_MARK_SENT = (
    jobs.update()
    .where(
        jobs.c.id.in_(sa.bindparam("p_ids", expanding=True)),
        jobs.c.status == JobStatus.PENDING.value,
    )
    .values(
        status=JobStatus.QUEUED.value,
        queued_at=sa.bindparam("p_now", type_=sa.Float),
        via="broker",
        publish_count=jobs.c.publish_count + 1,
    )
)


def mark_sent(job_ids: list[str], now: float) -> Prepared:
    """PENDING -> QUEUED for jobs the broker just accepted (the relay's record of what it
    published): from here the reaper knows a message carries them. A job a worker claimed
    meanwhile is left alone."""
    return _MARK_SENT, {"p_ids": list(job_ids), "p_now": now}


def mark_requeued(job_ids: list[str], message_id: str, now: float) -> Update:
    """Jobs handed back to the broker in a new bundle: their carrier is that message now."""
    return (
        jobs.update()
        .where(jobs.c.id.in_(job_ids), jobs.c.status.in_([s.value for s in CLAIMABLE]))
        .values(queued_at=now, message_id=message_id, publish_count=jobs.c.publish_count + 1)
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
        lease_expires_at=lease_until(sa.bindparam("p_lease", type_=sa.Float)),
        started_at=sa.bindparam("p_now"),
        via=sa.bindparam("p_via"),
        # next_attempt_at stays: RETURNING reads the row after the update, and the attempt's
        # queue wait runs from when it was due (a retry's backoff is not waiting). Only
        # QUEUED/RETRYING rows are ever read by it (the reaper's countdowns, queue ages).
        # The message this attempt runs from (a bundle's, for a bundled job): the one that
        # cancel(terminate=True) revokes.
        message_id=sa.func.coalesce(sa.bindparam("p_message", type_=sa.String), jobs.c.message_id),
    )
    # What the executor needs to run the attempt, not the whole row (result, traceback).
    .returning(
        jobs.c.queue,
        jobs.c.priority,
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
        "p_lease": float(lease_s),
        "p_now": now,
        "p_via": via,
    }


_COMPLETE = _fenced_p().values(
    status=JobStatus.SUCCEEDED.value,
    result=sa.bindparam("p_result", type_=sa.JSON),
    finished_at=sa.bindparam("p_now"),
    lease_owner=None,
    lease_expires_at=None,
    next_attempt_at=None,  # kept by the claim for the queue wait; none after the last
    progress_current=sa.func.coalesce(jobs.c.progress_total, jobs.c.progress_current),
)


def complete(job_id: str, attempt: int, *, result: Any, now: float) -> Prepared:
    return _COMPLETE, {"p_id": job_id, "p_attempt": attempt, "p_result": result, "p_now": now}


def mark_committed(job_id: str, attempt: int, now: float) -> Update:
    """In a job's own transaction: its effects commit with this fenced mark. A worker lost
    after it (before the completion) leaves the job done, not to be run again."""
    return _fenced(job_id, attempt).values(committed_at=now)


def fail(
    job_id: str, attempt: int, *, error: str, tb: str, retry_at: float | None, now: float
) -> Update:
    """An attempt raised: RETRYING with the next attempt's time, or DEAD; CANCELLED if a
    cancel was asked for meanwhile (a cancelled job never runs again). Returns the status."""
    cancelled = jobs.c.cancel_requested == sa.true()
    values: dict[str, Any] = {
        "error": error[:MAX_ERROR_CHARS],
        "traceback": tb[-MAX_TRACEBACK_CHARS:],
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if retry_at is None:
        values.update(
            status=sa.case((cancelled, JobStatus.CANCELLED.value), else_=JobStatus.DEAD.value),
            finished_at=now,
            next_attempt_at=None,
        )
    else:
        now_p = sa.literal(now, sa.Float)
        values.update(
            status=sa.case((cancelled, JobStatus.CANCELLED.value), else_=JobStatus.RETRYING.value),
            finished_at=sa.case((cancelled, now_p), else_=sa.null()),
            next_attempt_at=sa.case((cancelled, sa.null()), else_=sa.literal(retry_at, sa.Float)),
            # the retry's countdown message is published now: the reaper's clock starts here
            queued_at=sa.case((cancelled, jobs.c.queued_at), else_=now_p),
        )
    return _fenced(job_id, attempt).values(**values).returning(*ENDED)


def record_attempt(
    job_id: str,
    attempt: int,
    *,
    outcome: str,
    ran_on: str | None,
    started_at: float | None,
    now: float,
    error: str | None = None,
    tb: str | None = None,
) -> sa.Insert:
    """An attempt that ended without success, for the job's history."""
    return attempts.insert().values(
        job_id=job_id,
        attempt=attempt,
        outcome=outcome,
        ran_on=ran_on,
        started_at=started_at,
        ended_at=now,
        error=None if error is None else error[:MAX_ERROR_CHARS],
        traceback=None if tb is None else tb[-MAX_TRACEBACK_CHARS:],
    )


def mark_cancelled_running(job_id: str, attempt: int, now: float) -> Update:
    return (
        _fenced(job_id, attempt)
        .values(
            status=JobStatus.CANCELLED.value,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(*ENDED)
    )


def cancel_waiting(job_id: str, now: float) -> Update:
    """A job that has not started is cancelled at once; its message is skipped on delivery."""
    return (
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in CLAIMABLE]))
        .values(status=JobStatus.CANCELLED.value, finished_at=now, cancel_requested=True)
        .returning(*ENDED)
    )


def request_cancel_running(job_id: str, *, now: float, terminate: bool) -> Update:
    """Ask a running job to stop (it checks at progress()); with terminate, mark it now."""
    stmt = jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.STARTED.value)
    if terminate:  # not a job whose transaction committed: it is done, only not recorded yet
        stmt = stmt.where(jobs.c.committed_at.is_(None)).values(
            cancel_requested=True,
            status=JobStatus.CANCELLED.value,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
    else:
        stmt = stmt.values(cancel_requested=True)
    return stmt.returning(*ENDED)


_PROGRESS = (
    _fenced_p()
    .values(
        progress_current=sa.bindparam("p_current"),
        progress_total=sa.bindparam("p_total"),
        progress_message=sa.bindparam("p_message"),
        lease_expires_at=lease_until(sa.bindparam("p_lease", type_=sa.Float)),
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
    lease_s: float,
) -> Prepared:
    return _PROGRESS, {
        "p_id": job_id,
        "p_attempt": attempt,
        "p_current": current,
        "p_total": total,
        "p_message": None if message is None else message[:500],
        "p_lease": float(lease_s),
    }


_RENEW = _fenced_p().values(lease_expires_at=lease_until(sa.bindparam("p_lease", type_=sa.Float)))


def renew_lease(job_id: str, attempt: int, lease_s: float) -> Prepared:
    return _RENEW, {"p_id": job_id, "p_attempt": attempt, "p_lease": float(lease_s)}


def cancelled_among(job_ids: list[str]) -> sa.Select[Any]:
    """Which of these jobs were cancelled (with terminate: marked CANCELLED while running)."""
    return sa.select(jobs.c.id).where(
        jobs.c.id.in_(job_ids), jobs.c.status == JobStatus.CANCELLED.value
    )


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


def now_s() -> float:
    return time.time()
