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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from tasklab.celery_app import make_celery
from tasklab.observe.queues import QueueDepth, QueueProbe, oldest_waiting_ages
from tasklab.observe.workers import _is_local, _local_rss
from tasklab.service.console import data
from tasklab.settings import Settings

POLL_S = 2.0
BACKLOG_POLL_S = 1.0
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


@dataclass(frozen=True)
class Backlog:
    """What waits, from the broker and from the job records, as of ``taken_at``."""

    depths: dict[str, QueueDepth]
    unacked: int | None  # over all queues; None: the broker cannot tell
    broker_error: str | None
    oldest_age_s: dict[str, float]
    waiting: dict[str, int]  # job records waiting per queue
    running_locally: int
    taken_at: float


class Nodes:
    """One per app: a Celery control client, a queue probe and two polling threads (the
    fleet every ``POLL_S``, the backlog every ``BACKLOG_POLL_S``), so that no page waits for
    a broadcast or scans the waiting jobs: pages read the last answers."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.celery: Celery = make_celery(settings, include=[], for_publishing=True)
        self.probe = QueueProbe(settings)
        self.engine = engine  # sync engine: the waiting jobs' figures
        self.fleet = Fleet()
        self._backlog: Backlog | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Nodes:
        for name, interval_s, fn in (
            ("tasklab-console-fleet", POLL_S, self.poll),
            ("tasklab-console-backlog", BACKLOG_POLL_S, self.take_backlog),
        ):
            thread = threading.Thread(
                target=self._every, args=(interval_s, fn), name=name, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(INSPECT_TIMEOUT_S * 4)
        self.probe.close()
        self.celery.close()

    def _every(self, interval_s: float, fn: Callable[[], object]) -> None:
        while not self._stop.is_set():
            try:
                fn()
            except Exception:  # database or broker gone this round: the next one tries again
                log.warning("console poll failed", exc_info=True)
            self._stop.wait(interval_s)

    def poll(self) -> Fleet:
        try:
            fleet = Fleet(_inspect(self.celery), time.time())
        except Exception as e:  # broker down: keep the last nodes, say why
            fleet = Fleet(self.fleet.nodes, self.fleet.polled_at, f"{type(e).__name__}: {e}")
        self.fleet = fleet  # one reference swap: readers see the old or the new one
        return fleet

    def take_backlog(self) -> Backlog:
        error = None
        try:
            depths, unacked = self.probe.broker_depths()
        except Exception as e:  # the page still shows what SQL knows
            depths, unacked, error = {}, None, f"{type(e).__name__}: {e}"
        ages = oldest_waiting_ages(self.engine)
        with self.engine.connect() as conn:
            waiting = data.waiting_by_queue(conn)
            local = data.running_locally(conn)
        self._backlog = Backlog(depths, unacked, error, ages, waiting, local, time.time())
        return self._backlog

    # --- reads (blocking the first time only: run them in a thread) ----------------------------
    def backlog(self) -> Backlog:
        return self._backlog or self.take_backlog()

    def queues(self) -> list[QueueRow]:
        backlog = self.backlog()
        nodes = list(self.fleet.nodes.values())
        rows = []
        for queue in self.probe.queues:
            by = tuple(n.name for n in nodes if queue in n.queues)
            paused = tuple(n.name for n in nodes if n.queues and queue not in n.queues)
            depth, age = backlog.depths.get(queue), backlog.oldest_age_s.get(queue)
            rows.append(QueueRow(queue, depth, age, by, paused))
        return rows

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
