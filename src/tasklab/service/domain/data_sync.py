"""Requesting data-sync jobs (API side); the files are chosen here, parsed by the job."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklab.jobs import Job, JobManager
from tasklab.jobs.records import FINAL
from tasklab.jobs.records import jobs as job_records
from tasklab.service.domain.errors import InvalidField, NotFound, QuotaExceeded
from tasklab.service.domain.jobs import sync_batch, sync_file
from tasklab.service.domain.models import SyncFile
from tasklab.service.domain.orders import owner_of


class DataSync:
    """Data sync rewrites the shared sync tables: the routes let administrators only in, and
    each may have ``in_flight_max`` sync jobs not yet finished."""

    def __init__(self, engine: AsyncEngine, jobs: JobManager, *, in_flight_max: int = 4) -> None:
        self.engine = engine
        self.jobs = jobs
        self.in_flight_max = in_flight_max

    async def _check_quota(self, user_id: int) -> None:
        stmt = (
            sa.select(sa.func.count())
            .select_from(job_records)
            .where(
                job_records.c.owner == owner_of(user_id),
                job_records.c.task.in_([sync_batch.name, sync_file.name]),
                job_records.c.status.not_in([s.value for s in FINAL]),
            )
        )
        async with self.engine.connect() as conn:
            running = int((await conn.execute(stmt)).scalar_one())
        if running >= self.in_flight_max:
            raise QuotaExceeded(
                f"{running} of your data-sync jobs are not finished (the most is "
                f"{self.in_flight_max}): wait for them or cancel one"
            )

    async def batch(self, user_id: int, *, platform: str, limit: int, priority: int) -> Job:
        """Sync up to ``limit`` of the platform's files, oldest first, in one job."""
        await self._check_quota(user_id)
        stmt = (
            sa.select(SyncFile.id)
            .where(SyncFile.platform == platform)
            .order_by(SyncFile.id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            file_ids = list((await conn.execute(stmt)).scalars())
        if not file_ids:
            raise InvalidField(
                "platform", f"no sync files for platform {platform!r}", kind="unknown_platform"
            )
        return await self.jobs.asubmit(
            sync_batch, file_ids, priority=priority, owner=owner_of(user_id)
        )

    async def single(self, user_id: int, *, file_id: int, priority: int) -> Job:
        await self._check_quota(user_id)
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(sa.select(SyncFile.id).where(SyncFile.id == file_id))
            ).first()
        if found is None:
            raise NotFound("sync file", file_id)
        return await self.jobs.asubmit(
            sync_file, file_id, priority=priority, owner=owner_of(user_id)
        )
