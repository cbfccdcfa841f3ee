"""The live side of the console: queue depths from the broker, the worker nodes from Celery's
remote control, and the controls (pause/resume a queue on every node, grow/shrink a pool).

``inspect`` broadcasts wait out their whole timeout, so pages never call them: a thread asks
every ``POLL_S`` and pages read its last answer. A control action asks again at once, so the
overview shows its effect on the next render.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from tasklab.celery_app import make_celery
from tasklab.observe.queues import QueueDepth, QueueProbe, oldest_waiting_ages
from tasklab.observe.workers import _is_local, _local_rss
from tasklab.settings import Settings

POLL_S = 2.0
INSPECT_TIMEOUT_S = 0.8
CONTROL_TIMEOUT_S = 1.5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    name: str
    pool: str
    concurrency: int
    running: int
    rss_bytes: int | None
    queues: tuple[str, ...]  # queues it consumes now
    seen_at: float  # when it last answered

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.seen_at)


@dataclass(frozen=True)
class QueueRow:
    queue: str
    depth: QueueDepth | None
    oldest_age_s: float | None
    consumed_by: tuple[str, ...]
    paused_on: tuple[str, ...]  # nodes that consume some queue but not this one


@dataclass
class Fleet:
    nodes: dict[str, Node] = field(default_factory=dict)
    polled_at: float = 0.0
    error: str | None = None


class Nodes:
    """One per app: a Celery control client, a queue probe and the polling thread."""

    def __init__(self, settings: Settings, engine: Any) -> None:
        self.settings = settings
        self.celery: Celery = make_celery(settings, include=[], for_publishing=True)
        self.probe = QueueProbe(settings)
        self.engine = engine  # sync engine, for the oldest waiting job of each queue
        self.fleet = Fleet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Nodes:
        self._thread = threading.Thread(target=self._run, name="tasklab-console", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(INSPECT_TIMEOUT_S * 4)
        self.probe.close()
        self.celery.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._wake.wait(POLL_S)
            self._wake.clear()

    def poll(self) -> Fleet:
        try:
            fleet = Fleet(_inspect(self.celery), time.time())
        except Exception as e:  # broker down: keep the last nodes, say why
            fleet = Fleet(self.fleet.nodes, self.fleet.polled_at, f"{type(e).__name__}: {e}")
        with self._lock:
            self.fleet = fleet
        return fleet

    # --- reads (blocking: run them in a thread) ---------------------------------------------
    def queues(self) -> tuple[list[QueueRow], int | None, str | None]:
        """(a row per queue, unacked over all queues, the broker's error or None)."""
        error = None
        try:
            depths, unacked = self.probe.broker_depths()
        except Exception as e:  # the page still shows what SQL knows
            depths, unacked, error = {}, None, f"{type(e).__name__}: {e}"
        ages = oldest_waiting_ages(self.engine)
        nodes = list(self.fleet.nodes.values())
        rows = []
        for queue in self.probe.queues:
            by = tuple(n.name for n in nodes if queue in n.queues)
            paused = tuple(n.name for n in nodes if n.queues and queue not in n.queues)
            rows.append(QueueRow(queue, depths.get(queue), ages.get(queue), by, paused))
        return rows, unacked, error

    # --- controls (blocking) -----------------------------------------------------------------
    def pause(self, queue: str) -> list[str]:
        """Every node stops consuming ``queue``; the nodes that answered."""
        replies = self.celery.control.cancel_consumer(queue, reply=True, timeout=CONTROL_TIMEOUT_S)
        return self._after(replies)

    def resume(self, queue: str) -> list[str]:
        replies = self.celery.control.add_consumer(queue, reply=True, timeout=CONTROL_TIMEOUT_S)
        return self._after(replies)

    def resize(self, node: str, *, by: int) -> list[str]:
        """Grow (``by`` > 0) or shrink one node's pool by ``abs(by)`` processes."""
        control = self.celery.control
        call = control.pool_grow if by > 0 else control.pool_shrink
        replies = call(abs(by), destination=[node], reply=True, timeout=CONTROL_TIMEOUT_S)
        return self._after(replies)

    def _after(self, replies: Any) -> list[str]:
        self.poll()  # the overview shows the change on its next render
        return sorted(name for reply in replies or [] for name in reply)


def _inspect(app: Celery) -> dict[str, Node]:
    inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
    stats = inspect.stats() or {}
    if not stats:
        return {}
    targeted = app.control.inspect(timeout=INSPECT_TIMEOUT_S, destination=list(stats))
    active = targeted.active() or {}
    queues = targeted.active_queues() or {}
    now = time.time()
    return {
        name: _node(name, reply, active.get(name) or [], queues.get(name) or [], now)
        for name, reply in sorted(stats.items())
    }


def _node(
    name: str, reply: Mapping[str, Any], active: list[Any], queues: list[Any], now: float
) -> Node:
    pool = reply.get("pool") or {}
    pids = [int(p) for p in pool.get("processes") or []]
    rss = None
    if _is_local(name) and reply.get("pid") is not None:
        rss = _local_rss([int(reply["pid"]), *pids])
    if rss is None:
        rss = int((reply.get("rusage") or {}).get("maxrss") or 0) * 1024 or None
    return Node(
        name=name,
        # "celery.concurrency.prefork:TaskPool" -> "prefork"
        pool=str(pool.get("implementation", "?")).split(":", 1)[0].rsplit(".", 1)[-1],
        concurrency=len(pids) or int(pool.get("max-concurrency") or 0),
        running=len(active),
        rss_bytes=rss,
        queues=tuple(sorted(str(q.get("name")) for q in queues)),
        seen_at=now,
    )
