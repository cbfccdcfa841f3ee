"""Durable jobs over Celery: submit, status, progress, result, cancel, retry; never lost."""

from tasklab.jobs.execution import JobCancelled, JobContext, current_job
from tasklab.jobs.manager import JobManager
from tasklab.jobs.records import Job, JobStatus
from tasklab.jobs.registry import JobSpec, RetryPolicy, job

__all__ = [
    "Job",
    "JobCancelled",
    "JobContext",
    "JobManager",
    "JobSpec",
    "JobStatus",
    "RetryPolicy",
    "current_job",
    "job",
]
