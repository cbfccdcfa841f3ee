"""Bounded in-process executor for jobs the broker would not take.

It runs the same claim/lease/fence path as a worker. What it cannot take (full, shutting down)
stays PENDING in SQL for the reaper to publish once the broker is back; what it took but did
not finish (process exit) is recovered when its lease expires.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tasklab.observe import metrics

log = logging.getLogger("tasklab.jobs.fallback")


class LocalExecutor:
    def __init__(self, *, workers: int, queue_max: int) -> None:
        self.workers = workers
        self._slots = threading.BoundedSemaphore(max(1, workers + queue_max))
        self._pool: ThreadPoolExecutor | None = None
        self._closed = workers == 0
        self._lock = threading.Lock()

    def try_run(self, name: str, fn: Callable[[], str]) -> bool:
        """Run ``fn`` soon in a local thread; False if full or closed (the job stays PENDING)."""
        if self._closed or not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tasklab-local")
            pool = self._pool
        try:
            pool.submit(self._run, name, fn)
        except RuntimeError:  # pool shut down between the check and the submit
            self._slots.release()
            return False
        return True

    def _run(self, name: str, fn: Callable[[], str]) -> None:
        try:
            status = fn()
            metrics.LOCAL_EXECUTIONS.labels(name, status).inc()
        except Exception:
            log.exception("local execution of %s crashed", name)
            metrics.LOCAL_EXECUTIONS.labels(name, "crashed").inc()
        finally:
            self._slots.release()

    def shutdown(self, *, wait: bool) -> None:
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=not wait)
