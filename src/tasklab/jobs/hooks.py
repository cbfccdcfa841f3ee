"""Give-up hooks: what a job declares to run when it ends without succeeding.

``@job(on_give_up=fn)``: ``fn(conn, ended)`` runs inside the transaction that makes the job
DEAD or CANCELLED, on every path that does (its last attempt failed, its worker was lost on
the last attempt, a cancel), so the application's own rows move with it: the reference shop
rejects the order whose settlement gave up. It runs in a savepoint: if it raises, the error is
logged and the job's new state is committed without the hook's writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from tasklab.errors import UnknownTask
from tasklab.jobs.records import JobStatus
from tasklab.jobs.registry import get_spec

log = logging.getLogger("tasklab.jobs")
GAVE_UP = (JobStatus.DEAD.value, JobStatus.CANCELLED.value)


@dataclass(frozen=True)
class Ended:
    """A job that ended DEAD or CANCELLED, as its give-up hook sees it."""

    id: str
    task: str
    status: JobStatus
    args: list[Any]
    kwargs: dict[str, Any]
    error: str | None


def after_change(conn: Connection, row: Any) -> None:
    """Run the job's give-up hook if ``row`` (store.ENDED columns) says it gave up."""
    if row is None or row.status not in GAVE_UP:
        return
    try:
        hook = get_spec(row.task).on_give_up
    except UnknownTask:
        log.warning(
            "job %s (%s) ended %s: its task is not imported here", row.id, row.task, row.status
        )
        return
    if hook is None:
        return
    ended = Ended(
        row.id, row.task, JobStatus(row.status), list(row.args), dict(row.kwargs), row.error
    )
    try:
        with conn.begin_nested():
            hook(conn, ended)
    except Exception:
        log.exception("job %s (%s): its give-up hook failed", row.id, row.task)
