from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tasklab.jobs import JobManager
from tasklab.jobs.records import effects
from tasklab.migrations import migrate
from tasklab.settings import Settings


@pytest.fixture
def job_settings(tmp_path: Path, redis_url: str, database_url: str | None) -> Settings:
    """Migrated settings on the embedded Redis, once on SQLite and once on PostgreSQL."""
    settings = Settings(home_dir=tmp_path / ".tasklab", redis_url=redis_url,
                        database_url=database_url, worker_concurrency=2, lease_s=4,
                        reaper_interval_s=0.3, requeue_after_s=2, breaker_reset_s=0.5)
    migrate(settings)
    return settings


@pytest.fixture
def manager(job_settings: Settings) -> Iterator[JobManager]:
    jm = JobManager(job_settings)
    yield jm
    jm.close()


def effect_counts(jm: JobManager) -> dict[str, int]:
    """Effect rows per job id (written only through job.transaction())."""
    with jm.engine.connect() as conn:
        rows = conn.execute(sa.select(effects.c.job_id, sa.func.count())
                            .group_by(effects.c.job_id)).all()
    return {job_id: int(n) for job_id, n in rows}
