"""Probe jobs: the lab's workloads declared as durable tasklab jobs."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from tasklab.jobs import JobContext, job
from tasklab.jobs.records import effects
from tasklab.lab.bookkeeping import count_done


@job(name="tasklab.probe_job.noop", max_attempts=3)
def noop(sent_at: float | None = None) -> dict[str, Any]:
    return {"sent_at": sent_at, "finished_at": time.time()}


@job(name="tasklab.probe_job.counted", max_attempts=3)
def counted(sent_at: float | None = None) -> dict[str, Any]:
    """``noop`` plus the shared harness's bookkeeping (one Redis round trip): the bench's
    tasklab paths."""
    from celery import current_app

    count_done(str(current_app.conf.broker_url))
    return {"sent_at": sent_at, "finished_at": time.time()}


@job(name="tasklab.probe_job.sleep", max_attempts=3, bind=True)
def sleep(ctx: JobContext, seconds: float, steps: int = 1) -> dict[str, Any]:
    """Sleep in ``steps`` slices, reporting progress (and honouring cancel) between them."""
    for i in range(steps):
        time.sleep(seconds / steps)
        ctx.progress(i + 1, steps)
    return {"slept_s": seconds, "attempt": ctx.attempt}


@job(name="tasklab.probe_job.fail", max_attempts=2, backoff_s=0.2, jitter=False)
def fail(message: str = "probe failure") -> None:
    raise RuntimeError(message)


@job(name="tasklab.probe_job.effect", max_attempts=5, bind=True, backoff_s=0.2)
def effect(ctx: JobContext, hold_s: float = 0.0, fail_first: int = 0) -> dict[str, Any]:
    """Write one effect row through job.transaction(), after holding for ``hold_s`` (a window
    to kill the worker in). Fails the first ``fail_first`` attempts."""
    if hold_s:
        steps = max(1, int(hold_s / 0.1))
        for i in range(steps):
            time.sleep(hold_s / steps)
            ctx.progress(i + 1, steps)
    if ctx.attempt <= fail_first:
        raise RuntimeError(f"planned failure on attempt {ctx.attempt}")
    with ctx.transaction() as session:
        session.execute(
            effects.insert().values(job_id=ctx.id, attempt=ctx.attempt, created_at=time.time())
        )
    # where it ran, for drills that ask which node did the work (the lease owner's form)
    return {"attempt": ctx.attempt, "ran_on": f"{socket.gethostname()}:{os.getpid()}"}
