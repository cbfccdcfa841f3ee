"""Scheduled job-layer maintenance (run by beat): purge finished records past retention."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from tasklab.jobs.worker_side import runtime


@shared_task(name="tasklab.jobs.purge", bind=True, ignore_result=True)
def purge_finished(self: Any) -> int:
    from tasklab.jobs.recovery import Reaper

    rt = runtime(self.app)
    return Reaper(rt.settings, rt.engine, rt.publisher).purge()
