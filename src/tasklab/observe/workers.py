"""Worker metrics from Celery events (heartbeats) and ``inspect stats``, aggregated.

No hostname label: a fleet that autoscales would create a new series per pod name. The gauges
are sums (active tasks, processes, RSS) or extremes (stalest heartbeat) over all workers.

Sources:
* events: ``worker-heartbeat`` every ~2 s carries the number of active tasks; the local receive
  time of the last heartbeat gives its age; ``worker-offline`` removes a worker that stopped
  cleanly. A worker silent for ``forget_after_s`` is forgotten (scaled down or gone for good).
  ``task-sent`` events of beat's heartbeat task give beat's last dispatch time.
* ``inspect stats`` (one broadcast per refresh): pool processes and their pids. RSS is read
  with psutil for workers on this host; for remote workers the kernel's max RSS (``rusage``) is
  the best available figure.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil
from celery import Celery
from celery.events.state import State

from tasklab.observe.beat import BEAT_HEARTBEAT_TASK
from tasklab.observe.metrics import (
    BEAT_LAST_TICK,
    WORKER_ACTIVE_TASKS,
    WORKER_HEARTBEAT_AGE,
    WORKER_PROCESSES,
    WORKER_RSS,
    WORKERS_UP,
)

INSPECT_TIMEOUT_S = 1.0
FORGET_AFTER_S = 600.0
RECONNECT_DELAY_S = 1.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSnapshot:
    workers_up: int
    active_tasks: int
    processes: int
    rss_bytes: int
    heartbeat_age_s: float  # stalest live worker; 0 when none is known
    beat_last_sent_at: float | None  # epoch seconds of beat's last heartbeat dispatch

    def record(self) -> None:
        WORKERS_UP.set(self.workers_up)
        WORKER_ACTIVE_TASKS.set(self.active_tasks)
        WORKER_PROCESSES.set(self.processes)
        WORKER_RSS.set(self.rss_bytes)
        WORKER_HEARTBEAT_AGE.set(self.heartbeat_age_s)
        if self.beat_last_sent_at is not None:
            BEAT_LAST_TICK.set(self.beat_last_sent_at)


@dataclass(frozen=True)
class _PoolStats:
    processes: int
    rss_bytes: int


class WorkerMonitor:
    """Listens to Celery events in a thread and answers ``snapshot()`` on demand."""

    def __init__(
        self,
        app: Celery,
        *,
        inspect_timeout_s: float = INSPECT_TIMEOUT_S,
        forget_after_s: float = FORGET_AFTER_S,
    ) -> None:
        self.app = app
        self.inspect_timeout_s = inspect_timeout_s
        self.forget_after_s = forget_after_s
        self._state = State(max_tasks_in_memory=1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._receiver: Any = None
        self._thread: threading.Thread | None = None
        self._beat_last_sent_at: float | None = None
        self._last_pools: dict[str, _PoolStats] = {}
        # Further consumers of every event (tasklab.observe.events), called in the thread.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.receiving = False  # connected to the broker's event exchange right now

    # --- events --------------------------------------------------------------------------
    def start(self) -> WorkerMonitor:
        self._thread = threading.Thread(
            target=self._listen, name="tasklab-worker-events", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    self._receiver = self.app.events.Receiver(conn, handlers={"*": self.on_event})
                    if self._stop.is_set():
                        return
                    conn.ensure_connection(max_retries=1)
                    self.receiving = True
                    self._receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as e:  # broker restarts: reconnect, never kill the exporter
                self.receiving = False
                log.warning("event receiver: %s: %s; reconnecting", type(e).__name__, e)
                self._stop.wait(RECONNECT_DELAY_S)

    def on_event(self, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # one odd event must not stop the receiver
                log.exception("event listener failed on %s", event.get("type"))
        kind = event.get("type", "")
        if kind.startswith("worker-"):
            with self._lock:
                self._state.event(event)
        elif kind == "task-sent" and event.get("name") == BEAT_HEARTBEAT_TASK:
            self._beat_last_sent_at = float(event.get("timestamp") or time.time())

    # --- snapshot ------------------------------------------------------------------------
    def snapshot(self, *, now: float | None = None) -> WorkerSnapshot:
        now = time.time() if now is None else now
        alive, active, age = self._from_events(now)
        pools = {name: _pool_stats(name, reply) for name, reply in self._inspect_stats().items()}
        # A busy worker can miss the inspect deadline while its heartbeats say it is alive:
        # keep its last known pool figures rather than drop them to 0 for one round.
        for name in set(alive) - set(pools):
            if name in self._last_pools:
                pools[name] = self._last_pools[name]
        self._last_pools = pools
        up = set(alive) | set(pools)
        return WorkerSnapshot(
            workers_up=len(up),
            active_tasks=active,
            processes=sum(p.processes for p in pools.values()),
            rss_bytes=sum(p.rss_bytes for p in pools.values()),
            heartbeat_age_s=age,
            beat_last_sent_at=self._beat_last_sent_at,
        )

    def _from_events(self, now: float) -> tuple[list[str], int, float]:
        """(alive worker names, their active tasks, stalest heartbeat age) from events."""
        alive, active, age = [], 0, 0.0
        with self._lock:
            for name, worker in list(self._state.workers.items()):
                if not worker.heartbeats:  # went offline cleanly (State clears them)
                    continue
                silent_s = now - worker.heartbeats[-1]
                if silent_s > self.forget_after_s:
                    del self._state.workers[name]
                    continue
                age = max(age, silent_s)
                if now < worker.heartbeat_expires:
                    alive.append(name)
                    active += int(worker.active or 0)
        return alive, active, age

    def _inspect_stats(self) -> dict[str, dict[str, Any]]:
        try:
            replies = self.app.control.inspect(timeout=self.inspect_timeout_s).stats()
        except Exception as e:  # broker down: the events side still answers
            log.warning("inspect stats failed: %s", type(e).__name__)
            return {}
        return dict(replies or {})


def _pool_stats(nodename: str, reply: Mapping[str, Any]) -> _PoolStats:
    pool = reply.get("pool") or {}
    pids = [int(p) for p in pool.get("processes") or []]
    processes = len(pids) or int(pool.get("max-concurrency") or 0)
    main_pid = reply.get("pid")
    if _is_local(nodename) and main_pid is not None:
        rss = _local_rss([int(main_pid), *pids])
        if rss is not None:
            return _PoolStats(processes, rss)
    maxrss_kib = (reply.get("rusage") or {}).get("maxrss") or 0
    return _PoolStats(processes, int(maxrss_kib) * 1024)


def _is_local(nodename: str) -> bool:
    host = nodename.split("@", 1)[-1]
    return host in (socket.gethostname(), socket.getfqdn(), "localhost")


def _local_rss(pids: list[int]) -> int | None:
    """Sum of RSS of these pids, or None if the main one is not on this host."""
    total = 0
    for i, pid in enumerate(pids):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            if i == 0:
                return None
    return total
