"""What the job state-machine tests share: job declarations, settings on a Redis broker of the
test's own (SQLite and PostgreSQL), and rows put in a given state directly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from tasklab.database import writing
from tasklab.embedded import EmbeddedRedis
from tasklab.jobs import JobContext, JobManager, job, store
from tasklab.jobs.carriers import redis_list
from tasklab.jobs.execution import Executor
from tasklab.jobs.hooks import Ended
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.publisher import BUNDLE_TASK
from tasklab.jobs.records import effects
from tasklab.jobs.recovery import Reaper
from tasklab.settings import Settings
from tests.jobs.conftest import queued_messages
from tests.support.schema import migrated

BACKOFF_S = 5.0
RETENTION_DAYS = 30.0


@job(name="tests.state.flaky", max_attempts=2, backoff_s=BACKOFF_S, jitter=False, bind=True)
def flaky(ctx: JobContext) -> None:
    raise RuntimeError(f"boom {ctx.attempt}")


def _give_up(conn: sa.Connection, ended: Ended) -> None:
    """The application's row that moves with a job that gave up (attempt -1 marks it)."""
    conn.execute(effects.insert().values(job_id=ended.id, attempt=-1, created_at=0.0))


@job(name="tests.state.gives_up", max_attempts=1, on_give_up=_give_up)
def gives_up() -> None:
    raise RuntimeError("no")


def settings_for(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    """Migrated settings on ``broker``; a job the broker refuses waits in SQL (no local
    workers)."""
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=broker.url,
        database_url=database_url,
        local_workers=0,
        job_retention_days=RETENTION_DAYS,
        breaker_reset_s=60,
    )
    migrated(settings)
    return settings


def manager_for(settings: Settings) -> Iterator[JobManager]:
    manager = JobManager(settings)
    yield manager
    manager.close()


def reaper_for(settings: Settings, jm: JobManager) -> Iterator[Reaper]:
    r = Reaper(settings, jm.engine, jm.publisher)
    yield r
    r.close()


def inserted(jm: JobManager, spec: Any, *, countdown_s: float = 0, **values: Any) -> str:
    """A committed job no message carries (as if its relay had not published it yet), with
    ``values`` written over its row."""
    prepared = jm.prepare(spec, countdown_s=countdown_s)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
        if values:
            conn.execute(store.jobs.update().where(store.jobs.c.id == prepared.id).values(**values))
    return prepared.id


def running(jm: JobManager, spec: Any, *, lease_s: float, **values: Any) -> str:
    """A job claimed by a worker ("gone") with a lease of ``lease_s`` from now."""
    job_id = inserted(jm, spec)
    with writing(jm.engine) as conn:
        claim = store.claim(job_id, lease_owner="gone", lease_s=lease_s, via="broker", now=1.0)
        assert conn.execute(*claim).first() is not None
        if values:
            conn.execute(store.jobs.update().where(store.jobs.c.id == job_id).values(**values))
    return job_id


def next_attempt_at(jm: JobManager, job_id: str) -> float | None:
    """When a job's next attempt is due (a column the Job snapshot does not carry)."""
    with jm.engine.connect() as conn:
        return conn.execute(*store.select_job(job_id)).one().next_attempt_at


def carried(client: redis.Redis, queue: str) -> list[str]:
    """The job ids the messages waiting on ``queue`` carry (a bundle carries several)."""
    return [
        job_id
        for task, _, args in queued_messages(client, queue)
        for job_id in (args[1] if task == BUNDLE_TASK else args)
    ]


def executor(jm: JobManager, reschedule: Callable[..., None] = lambda *a: None) -> Executor:
    return Executor(
        jm.engine,
        lease_owner="state-test",
        via="broker",
        default_lease_s=30,
        leases=LeaseKeeper(jm.engine),
        reschedule=reschedule,
    )


def lose_the_message_of(client: redis.Redis, queue: str, priority: int) -> None:
    """A worker reserved the message, then died: it is gone from the queue."""
    assert client.rpop(redis_list(queue, priority)) is not None
