"""Data sync: start sync jobs (202) and read their status (the seeds' path)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from tasklab.jobs import Job
from tasklab.service.deps import AdminUser, CurrentUser, ServicesDep
from tasklab.service.problems import documented
from tasklab.service.routes.jobs import JobId
from tasklab.service.schemas import JobAccepted, JobView, SyncBatchIn, SyncFileIn

router = APIRouter(
    prefix="/api/v1/data-sync", tags=["data sync"], responses=documented(401, 422, 429, 503)
)


def _accepted(job: Job) -> dict[str, Any]:
    return {"job_id": job.id, "celery_task_id": job.message_id, "status": job.status.value}


@router.post(
    "/sync-batch",
    status_code=202,
    response_model=JobAccepted,
    responses=documented(400, 403, 413, 415),
)
async def sync_batch(services: ServicesDep, user: AdminUser, body: SyncBatchIn) -> Any:
    """Sync up to ``limit`` of the platform's files in one job, progress per file
    (administrators only: it rewrites the shared sync tables)."""
    job = await services.data_sync.batch(
        user.user_id, platform=body.platform, limit=body.limit, priority=body.priority
    )
    return _accepted(job)


@router.post(
    "/sync-single-file",
    status_code=202,
    response_model=JobAccepted,
    responses=documented(400, 403, 404, 413, 415),
)
async def sync_single_file(services: ServicesDep, user: AdminUser, body: SyncFileIn) -> Any:
    """One file in one job (administrators only)."""
    job = await services.data_sync.single(
        user.user_id, file_id=body.file_id, priority=body.priority
    )
    return _accepted(job)


@router.get("/task-status/{job_id}", response_model=JobView, responses=documented(404))
async def task_status(services: ServicesDep, user: CurrentUser, job_id: JobId) -> Any:
    """The same answer as ``GET /api/v1/jobs/{job_id}``."""
    return await services.job_views.get(job_id, user_id=user.user_id, admin=user.is_admin)
