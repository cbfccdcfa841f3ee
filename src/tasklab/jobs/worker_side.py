"""Per-process job runtime inside Celery workers: engine, lease keeper, executor, reaper."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import redis
from billiard.process import current_process
from celery import Celery
from sqlalchemy import Engine

from tasklab.database import make_engine, writing
from tasklab.jobs import store
from tasklab.jobs.execution import Executor
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.publisher import Publisher
from tasklab.jobs.registry import JobSpec
from tasklab.links import watch_links
from tasklab.observe.queues import amqp_queue_depths, redis_queue_depths
from tasklab.settings import Settings, load_settings

_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


class WorkerRuntime:
    """Built lazily in each pool process (after fork), never in the parent at import."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.engine: Engine = make_engine(settings)
        # A pool process may end itself for a job cancelled with terminate (see lease.py);
        # a solo or threads pool runs every job in the worker itself, which must live on.
        in_pool_child = current_process().name != "MainProcess"
        self.leases = LeaseKeeper(
            self.engine, terminate_self=settings.worker_pool == "prefork" and in_pool_child
        )
        self.publisher = Publisher(settings)
        self.executor = Executor(
            self.engine,
            lease_owner=f"{socket.gethostname()}:{self.pid}",
            via="broker",
            default_lease_s=settings.lease_s,
            leases=self.leases,
            reschedule=self.publisher.reschedule,
            hand_back=self.hand_back,
            bundle_budget_s=settings.bundle_budget_s,
            queue_busy=self.queue_busy,
        )
        self._broker_client: redis.Redis | None = None
        # A pool process's own database connections (the main process watches its own and
        # the broker's: tasklab.worker).
        self.links = watch_links(settings, broker=False) if in_pool_child else None

    def queue_busy(self, queue: str) -> bool:
        """Whether ``queue`` has messages waiting (then a bundle keeps its jobs: see
        tasklab.jobs.bundle). One LLEN per priority list, or a passive declare."""
        if self.settings.broker_is_redis:
            if self._broker_client is None:
                timeout_s = self.settings.publish_timeout_s
                self._broker_client = redis.Redis.from_url(
                    self.settings.effective_broker_url,
                    socket_timeout=timeout_s,
                    socket_connect_timeout=timeout_s,
                )
            return redis_queue_depths(self._broker_client, [queue])[queue].total > 0
        with self.publisher.app.connection_for_read() as conn:
            return amqp_queue_depths(conn, [queue])[queue].total > 0

    def hand_back(self, task: str, job_ids: list[str], queue: str, priority: int) -> str:
        """Publish a bundle's jobs not started yet as a new bundle, and record that message
        as their carrier (the reaper then counts their wait from now)."""
        message_id = self.publisher.publish_bundle(task, job_ids, queue, priority)
        with writing(self.engine) as conn:
            conn.execute(store.mark_requeued(job_ids, message_id, time.time()))
        return message_id


def settings_of(app: Celery) -> Settings:
    settings = getattr(app, "tasklab_settings", None)
    return settings if isinstance(settings, Settings) else load_settings()


def runtime(app: Celery) -> WorkerRuntime:
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(settings_of(app))
        return _runtime


def run_delivery(app: Celery, spec: JobSpec, job_id: str, message_id: str | None) -> Any:
    return runtime(app).executor.run(spec, job_id, message_id=message_id).status


def run_bundle(
    app: Celery,
    spec: JobSpec,
    job_ids: list[str],
    queue: str,
    priority: int,
    message_id: str | None,
) -> None:
    runtime(app).executor.run_bundle(
        spec, job_ids, queue=queue, priority=priority, message_id=message_id
    )
