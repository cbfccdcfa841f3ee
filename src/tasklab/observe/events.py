"""Celery events → task metrics, for any Celery app (``tasklab exporter --app module:celery``).

The exporter's event receiver hands every event to ``TaskEvents.on_event``. Names and labels
follow celery-exporter (``celery_task_<state>_total{name, hostname, queue_name}``,
``celery_task_runtime_seconds``, ``celery_task_queue_wait_time_seconds``,
``celery_worker_up{hostname}``, ``celery_worker_tasks_active{hostname}``) so its dashboards
and alerts work on them; docs/observability.md compares the two.

Workers send task events only when started with ``-E`` (``worker_send_task_events``);
``task-sent`` comes from producers with ``task_send_sent_event``. Without ``task-sent`` a
task's queue is unknown and reads as the app's default queue (as in celery-exporter).
``task-sent`` is counted under ``hostname="generic"``: producers are every web and script
process, each its own node name.

Labels stay bounded: each label takes at most ``max_label_values`` distinct values (task
names, hostnames, queues, exception types); further ones read ``other``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.events.state import State
from celery.utils.time import maybe_iso8601

from tasklab.observe.metrics import (
    CELERY_TASK_COUNTERS,
    CELERY_TASK_QUEUE_WAIT,
    CELERY_TASK_RUNTIME,
    CELERY_WORKER_TASKS_ACTIVE,
    CELERY_WORKER_UP,
)

OTHER = "other"
GENERIC_HOST = "generic"  # celery-exporter's --generic-hostname-task-sent-metric
DEFAULT_MAX_LABEL_VALUES = 100
TASKS_IN_MEMORY = 10_000  # tasks whose name/queue/sent time are kept between their events
FORGET_WORKER_AFTER_S = 600.0

log = logging.getLogger(__name__)


class BoundedLabel:
    """The first ``limit`` distinct values pass; later ones read ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: object) -> str:
        text = str(value) if value not in (None, "") else "unknown"
        if text in self._seen:
            return text
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(text)
        return text


class TaskEvents:
    """Counts task events per task name, host and queue; times runs and queue waits; tracks
    each worker's liveness and active tasks from its heartbeats."""

    def __init__(
        self,
        *,
        default_queue: str = "celery",
        max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
        forget_worker_after_s: float = FORGET_WORKER_AFTER_S,
    ) -> None:
        self.default_queue = default_queue
        self.forget_worker_after_s = forget_worker_after_s
        self._state = State(max_tasks_in_memory=TASKS_IN_MEMORY)
        self._lock = threading.Lock()
        self._name = BoundedLabel(max_label_values)
        self._host = BoundedLabel(max_label_values)
        self._queue = BoundedLabel(max_label_values)
        self._exception = BoundedLabel(max_label_values)
        self._workers: dict[str, float] = {}  # hostname label -> last heartbeat (epoch s)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type", ""))
        with self._lock:
            if kind.startswith("task-"):
                self._task_event(kind, event)
            elif kind.startswith("worker-"):
                self._worker_event(kind, event)

    def _task_event(self, kind: str, event: dict[str, Any]) -> None:
        (task, _created), _ = self._state.event(event)
        if task is None:
            return
        counter = CELERY_TASK_COUNTERS.get(kind)
        if counter is None:
            return
        # task-sent comes from every producer process (gen<pid>@host): one label for them all
        host = GENERIC_HOST if kind == "task-sent" else self._host(event.get("hostname"))
        labels = {
            "name": self._name(task.name),
            "hostname": host,
            "queue_name": self._queue(getattr(task, "queue", None) or self.default_queue),
        }
        if kind == "task-failed":
            counter.labels(**labels, exception=self._exception(_exception_type(task))).inc()
        else:
            counter.labels(**labels).inc()
        # task-sent (from the producer) may arrive after the worker's task-started: observe
        # the wait at whichever of the two comes second
        if kind == "task-started" or (kind == "task-sent" and task.started is not None):
            wait_s = _queue_wait_s(task)
            if wait_s is not None:
                labels["hostname"] = self._host(task.worker.hostname if task.worker else None)
                CELERY_TASK_QUEUE_WAIT.labels(**labels).observe(wait_s)
        elif kind == "task-succeeded" and task.runtime is not None:
            CELERY_TASK_RUNTIME.labels(**labels).observe(float(task.runtime))

    def _worker_event(self, kind: str, event: dict[str, Any]) -> None:
        (worker, _created), _ = self._state.event(event)
        host = self._host(event.get("hostname"))
        if kind == "worker-offline":
            CELERY_WORKER_UP.labels(host).set(0)
            CELERY_WORKER_TASKS_ACTIVE.labels(host).set(0)
            return
        self._workers[host] = time.time()
        CELERY_WORKER_UP.labels(host).set(1)
        CELERY_WORKER_TASKS_ACTIVE.labels(host).set(int(getattr(worker, "active", 0) or 0))

    def expire_workers(self, *, now: float | None = None) -> None:
        """A worker silent past its heartbeat expiry is down; one silent for
        ``forget_worker_after_s`` loses its series. Called by the exporter each round."""
        now = time.time() if now is None else now
        with self._lock:
            alive = {
                str(name): w.heartbeat_expires
                for name, w in self._state.workers.items()
                if w.heartbeats
            }
            for host, last_s in list(self._workers.items()):
                if now - last_s > self.forget_worker_after_s:
                    CELERY_WORKER_UP.remove(host)
                    CELERY_WORKER_TASKS_ACTIVE.remove(host)
                    del self._workers[host]
                elif host in alive and now > alive[host]:
                    CELERY_WORKER_UP.labels(host).set(0)


def _exception_type(task: Any) -> str:
    """``ValueError('x')`` → ``ValueError``: the type, never the message (unbounded)."""
    text = str(getattr(task, "exception", "") or "")
    return text.split("(", 1)[0].strip() or "unknown"


def _queue_wait_s(task: Any) -> float | None:
    """From ``task-sent`` (or the end of its countdown/ETA, when later) to ``task-started``;
    None without a sent time (producers without ``task_send_sent_event``)."""
    if task.sent is None or task.started is None:
        return None
    since = float(task.sent)
    eta = maybe_iso8601(task.eta) if task.eta else None
    if eta is not None:
        since = max(since, eta.timestamp())
    return max(0.0, float(task.started) - since)
