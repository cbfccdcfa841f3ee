"""A job between its insert and its publish: what ``JobManager.prepare`` hands back to the
caller's transaction, and the job as ``submit`` returns it without reading it back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasklab.jobs import store
from tasklab.jobs.records import Job, JobStatus
from tasklab.jobs.registry import JobSpec


@dataclass(frozen=True)
class PreparedJob:
    """A job ready to be inserted by the caller's transaction (see JobManager.prepare)."""

    spec: JobSpec
    values: dict[str, Any]
    countdown_s: float

    @property
    def id(self) -> str:
        return str(self.values["job_id"])

    @property
    def insert(self) -> store.Prepared:
        """(statement, parameters) that insert the job row."""
        return store.insert_job(**self.values)


def submitted_job(values: dict[str, Any], via: str, *, published: bool = True) -> Job:
    """The job as submit() left it, without reading it back (a local run may already have
    moved it on; get() shows the latest): PENDING until a message carries it."""
    queued = via == "broker" and published
    return Job(
        id=values["job_id"],
        task=values["task"],
        args=values["args"],
        kwargs=values["kwargs"],
        queue=values["queue"],
        priority=values["priority"],
        owner=values["owner"],
        idempotency_key=values["idempotency_key"],
        status=JobStatus.QUEUED if queued else JobStatus.PENDING,
        attempt=0,
        max_attempts=values["max_attempts"],
        progress_current=None,
        progress_total=None,
        progress_message=None,
        result=None,
        error=None,
        traceback=None,
        via=via,
        message_id=values["message_id"] if queued else None,
        created_at=values["now"],
        queued_at=values["now"] if queued else None,
        started_at=None,
        finished_at=None,
        publish_count=1 if queued else 0,
    )
