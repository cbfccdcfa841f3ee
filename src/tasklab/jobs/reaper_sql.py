"""The reaper's statements on the jobs table (tasklab.jobs.recovery): expired leases, jobs
no message carries, the take that lets several reapers share the work, retention."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.dml import Update

from tasklab.jobs.records import (
    CLAIMABLE,
    FINAL,
    JobStatus,
    attempts,
    carried_rows,
    jobs,
    running_rows,
    waiting_rows,
)
from tasklab.jobs.store import ENDED, db_now


def expired_leases(limit: int) -> sa.Select[Any]:
    return (
        sa.select(
            jobs.c.id,
            jobs.c.task,
            jobs.c.queue,
            jobs.c.priority,
            jobs.c.attempt,
            jobs.c.max_attempts,
            jobs.c.lease_owner,
            jobs.c.started_at,
        )
        .where(running_rows(), jobs.c.lease_expires_at < db_now())
        .limit(limit)
    )


def release_expired(job_id: str, attempt: int, now: float, *, dead: bool) -> Update:
    """Take back a job whose lease ran out (its worker died): PENDING for the reaper to
    publish, DEAD on its last attempt, CANCELLED if a cancel was asked for. Returns the
    status it ended in."""
    cancelled = jobs.c.cancel_requested == sa.true()
    if dead:
        status: Any = JobStatus.DEAD.value
        finished: Any = now
        error = "lease expired on the last attempt (worker lost)"
    else:
        status, finished = JobStatus.PENDING.value, None
        error = "lease expired (worker lost); re-queued"
    committed = jobs.c.committed_at.is_not(None)  # its transaction is in: it is done
    lost_after = "its worker was lost after its transaction committed; result not recorded"
    return (
        jobs.update()
        .where(
            jobs.c.id == job_id,
            jobs.c.attempt == attempt,
            jobs.c.status == JobStatus.STARTED.value,
            jobs.c.lease_expires_at < db_now(),
        )
        .values(
            status=sa.case(
                (committed, JobStatus.SUCCEEDED.value),
                (cancelled, JobStatus.CANCELLED.value),
                else_=status,
            ),
            finished_at=sa.case(
                (committed, sa.literal(now, sa.Float)),
                (cancelled, sa.literal(now, sa.Float)),
                else_=sa.literal(finished, sa.Float),
            ),
            lease_owner=None,
            lease_expires_at=None,
            error=sa.case(
                (committed, lost_after),
                (cancelled, "cancelled; its worker was lost"),
                else_=error,
            ),
        )
        .returning(*ENDED)
    )


def finish_cancel_requested(now: float) -> Update:
    """Jobs left waiting with a cancel asked for (by versions that kept the flag on a retry
    or a lost lease): no claim can take them, so they end CANCELLED."""
    return (
        jobs.update()
        .where(
            waiting_rows(),
            jobs.c.status.in_([s.value for s in CLAIMABLE]),
            jobs.c.cancel_requested == sa.true(),
        )
        .values(status=JobStatus.CANCELLED.value, finished_at=now)
        .returning(*ENDED)
    )


STRANDED_COLUMNS = (
    jobs.c.id,
    jobs.c.task,
    jobs.c.queue,
    jobs.c.priority,
    jobs.c.status,
    jobs.c.next_attempt_at,
)


def stranded(
    *,
    pending_before: float,
    due_before: float,
    left_broker: dict[tuple[str, int], float],
    limit: int,
) -> sa.Select[Any]:
    """Jobs that should be in the broker but may not be:

    - PENDING since before ``pending_before``: never published (the relay's process died,
      the broker refused it) or taken back from a lost worker;
    - QUEUED/RETRYING whose message has left the broker's queue: ``left_broker`` maps
      (queue, priority) to a time before which every message published there had been
      delivered at least ``requeue_after_s`` ago; a job published before that and still not
      started lost its carrier (reserved by a worker that died, or in a bundle it held). A
      countdown job counts once it is due since ``due_before``.
    """
    # Each branch names a partial index's predicate and reads a range of it: PENDING jobs by
    # created_at, published ones by queued_at.
    pending = sa.and_(
        waiting_rows(),
        jobs.c.status == JobStatus.PENDING.value,
        jobs.c.created_at < pending_before,
    )
    conds: list[Any] = [pending]
    if left_broker:
        delivered = sa.or_(
            *(
                sa.and_(jobs.c.queue == q, jobs.c.priority == p, jobs.c.queued_at < before)
                for (q, p), before in sorted(left_broker.items())
            )
        )
        conds.append(
            sa.and_(
                carried_rows(),
                jobs.c.queued_at < max(left_broker.values()),
                delivered,
                sa.or_(jobs.c.next_attempt_at.is_(None), jobs.c.next_attempt_at < due_before),
            )
        )
    return (
        sa.select(*STRANDED_COLUMNS).where(sa.or_(*conds)).order_by(jobs.c.created_at).limit(limit)
    )


def take_for_republish(job_ids: list[str], *, before: float, now: float) -> Update:
    """Take the stranded jobs this reaper found, unless another reaper (or the relay, or a
    worker) moved them since: only the rows still PENDING, or still carried by a message
    older than ``before``, come back. Reapers of several workers share the work this way,
    without publishing a job twice."""
    return (
        jobs.update()
        .where(
            jobs.c.id.in_(job_ids),
            sa.or_(
                jobs.c.status == JobStatus.PENDING.value,
                sa.and_(
                    jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RETRYING.value]),
                    jobs.c.queued_at < before,
                ),
            ),
        )
        .values(
            status=JobStatus.QUEUED.value,
            queued_at=now,
            via="broker",
            publish_count=jobs.c.publish_count + 1,
        )
        .returning(jobs.c.id)
    )


def untake(job_ids: list[str], *, taken_at: float) -> Update:
    """The broker refused what a reaper took: the jobs wait in SQL (PENDING) again."""
    return (
        jobs.update()
        .where(
            jobs.c.id.in_(job_ids),
            jobs.c.status == JobStatus.QUEUED.value,
            jobs.c.queued_at == taken_at,
        )
        .values(status=JobStatus.PENDING.value, publish_count=jobs.c.publish_count - 1)
    )


def queued_at_of(job_ids: list[str]) -> sa.Select[Any]:
    return sa.select(jobs.c.id, sa.func.coalesce(jobs.c.queued_at, jobs.c.created_at)).where(
        jobs.c.id.in_(job_ids)
    )


def purge_finished(before: float) -> sa.Delete:
    return jobs.delete().where(
        jobs.c.status.in_([s.value for s in FINAL]), jobs.c.finished_at < before
    )


def purge_attempts(before: float) -> sa.Delete:
    """The history of jobs no longer there (run after purge_finished), and older than it."""
    return attempts.delete().where(
        attempts.c.ended_at < before, attempts.c.job_id.not_in(sa.select(jobs.c.id))
    )
