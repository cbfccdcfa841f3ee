"""The caller's jobs: status, progress, result, error, timestamps."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query

from tasklab.service.deps import CurrentUser, PageNo, PageSize, ServicesDep
from tasklab.service.problems import documented
from tasklab.service.schemas import JobView, Page

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], responses=documented(401, 422, 429, 503))
JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
JobStatusFilter = Literal[
    "PENDING", "QUEUED", "STARTED", "RETRYING", "SUCCEEDED", "DEAD", "CANCELLED"
]


@router.get("", response_model=Page[JobView])
async def list_jobs(
    services: ServicesDep,
    user: CurrentUser,
    page: PageNo = 1,
    page_size: PageSize = 20,
    status: Annotated[JobStatusFilter | None, Query()] = None,
) -> Any:
    result = await services.job_views.page(
        user.user_id, page=page, page_size=page_size, status=status
    )
    return result.to_dict()


@router.get("/{job_id}", response_model=JobView, responses=documented(404))
async def get_job(services: ServicesDep, user: CurrentUser, job_id: JobId) -> Any:
    return await services.job_views.get(job_id, user_id=user.user_id, admin=user.is_admin)
