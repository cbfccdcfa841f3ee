"""Jobs as a user sees them: only their own (anyone else's id is "not found")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from tasklab.errors import JobNotFound
from tasklab.jobs import Job, JobManager
from tasklab.service.domain.errors import NotFound
from tasklab.service.domain.orders import owner_of
from tasklab.service.domain.paging import Page, at

MAX_PUBLIC_ERROR_CHARS = 200


def public_error(error: str | None) -> str | None:
    """What failed, for the job's owner: the error's first line, without the SQL statement
    and parameters a database error carries (``[SQL: ...]``, ``DETAIL: Key (id)=(5)``). The
    full error stays in the job record, the worker's log and the administrators' view."""
    if error is None:
        return None
    first = error.split("\n", 1)[0].split("[SQL:", 1)[0].strip()
    return first[:MAX_PUBLIC_ERROR_CHARS]


def job_dict(job: Job, *, admin: bool = False) -> dict[str, Any]:
    """The public view of a job: no arguments, no traceback, times as datetimes; the error
    in full for administrators only."""
    return {
        "job_id": job.id,
        "task": job.task,
        "status": job.status.value,
        "queue": job.queue,
        "priority": job.priority,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "progress": {
            "current": job.progress_current,
            "total": job.progress_total,
            "message": job.progress_message,
        },
        "result": job.result,
        "error": job.error if admin else public_error(job.error),
        "via": job.via,
        "celery_task_id": job.message_id,
        "created_at": at(job.created_at),
        "queued_at": at(job.queued_at),
        "started_at": at(job.started_at),
        "finished_at": at(job.finished_at),
    }


class JobViews:
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

    async def get(self, job_id: str, *, user_id: int, admin: bool = False) -> dict[str, Any]:
        try:
            job = await self.jobs.aget(job_id)
        except JobNotFound:
            raise NotFound("job", job_id) from None
        if not admin and job.owner != owner_of(user_id):
            raise NotFound("job", job_id)
        return job_dict(job, admin=admin)

    async def page(
        self, user_id: int, *, page: int, page_size: int, status: str | None = None
    ) -> Page:
        found, total = await self.jobs.alist(
            owner=owner_of(user_id), status=status, page=page, page_size=page_size
        )
        # cast: inside JobManager, ``list[Job]`` names its own ``list`` method for mypy
        jobs = cast(Sequence[Job], found)
        return Page([job_dict(j) for j in jobs], page, page_size, total)
