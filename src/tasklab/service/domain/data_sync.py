"""Requesting data-sync jobs (API side); the files are chosen here, parsed by the job."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklab.jobs import Job, JobManager
from tasklab.service.domain.errors import InvalidField, NotFound
from tasklab.service.domain.jobs import sync_batch, sync_file
from tasklab.service.domain.models import SyncFile
from tasklab.service.domain.orders import owner_of


class DataSync:
    def __init__(self, engine: AsyncEngine, jobs: JobManager) -> None:
        self.engine = engine
        self.jobs = jobs

    async def batch(self, user_id: int, *, platform: str, limit: int, priority: int) -> Job:
        """Sync up to ``limit`` of the platform's files, oldest first, in one job."""
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
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(sa.select(SyncFile.id).where(SyncFile.id == file_id))
            ).first()
        if found is None:
            raise NotFound("sync file", file_id)
        return await self.jobs.asubmit(
            sync_file, file_id, priority=priority, owner=owner_of(user_id)
        )
