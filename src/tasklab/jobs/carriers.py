"""What the reaper sees of the broker: how far each queue has been delivered.

A QUEUED job is carried by a message. Under a backlog the queue is never empty, so "the queue
is empty, its message cannot be waiting there" says nothing for hours. What the reaper needs is
when the job's message *left* the queue: kombu's Redis transport keeps one FIFO list per queue
and priority (``LPUSH`` in, ``BRPOP`` out), so the message at the list's right end is the
oldest still waiting, and every message published before it has been delivered. Each tick
records, per list, the time that head job was published (or the tick's time, for an empty
list). A job published before a mark taken at least ``requeue_after_s`` ago, and not started
yet, was delivered long ago to a worker that did not run it: one that died holding it (reserved
by prefetch, or in a bundle). The reaper publishes it again; a live worker that still holds a
copy finds it claimed (a skipped claim is the whole cost of a duplicate).

RabbitMQ gives a dead consumer's unacked messages back at once; its marks come from queues
with no ready message only (a passive declare counts them).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import redis
from sqlalchemy import Engine

from tasklab.celery_app import MAX_PRIORITY, QUEUES
from tasklab.jobs import reaper_sql
from tasklab.jobs.publisher import BUNDLE_TASK

log = logging.getLogger("tasklab.jobs.reaper")
List = tuple[str, int]  # (queue, tasklab priority)
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def redis_list(queue: str, priority: int) -> str:
    """kombu's list for a tasklab priority: priorities are mirrored on Redis (9 - p is the
    kombu priority, 0 popped first) and kombu keeps priority k > 0 in "queue:k"."""
    k = MAX_PRIORITY - priority
    return queue if k == 0 else f"{queue}:{k}"


def job_of(raw: bytes | str) -> str | None:
    """The first job id a kombu Redis message carries (a job's or a bundle's), or None."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        task = message.get("headers", {}).get("task")
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if task == BUNDLE_TASK and len(args) >= 2 and args[1]:
        args = args[1]
    first = args[0] if isinstance(args, list) and args else None
    return first if isinstance(first, str) and _JOB_ID.match(first) else None


class Marks:
    """Per list, the marks of recent ticks: (tick time, published-before time)."""

    def __init__(self) -> None:
        self._seen: dict[List, deque[tuple[float, float]]] = {}

    def add(self, key: List, tick_at: float, before: float) -> None:
        self._seen.setdefault(key, deque()).append((tick_at, before))

    def settled(self, older_than: float) -> dict[List, float]:
        """Per list, the newest mark taken before ``older_than`` (older ones are dropped)."""
        out: dict[List, float] = {}
        for key, marks in self._seen.items():
            while len(marks) > 1 and marks[1][0] <= older_than:
                marks.popleft()
            if marks and marks[0][0] <= older_than:
                out[key] = marks[0][1]
        return out


class RedisCarriers:
    """Marks for a Redis broker: the head of each (queue, priority) list, every tick."""

    def __init__(self, client: redis.Redis, engine: Engine, queues: Iterable[str] = QUEUES):
        self.client = client
        self.engine = engine
        self.lists = [(q, p) for q in queues for p in range(MAX_PRIORITY + 1)]
        self.marks = Marks()

    def observe(self, now: float) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for q, p in self.lists:
                pipe.lindex(redis_list(q, p), -1)
            heads = pipe.execute()
        except redis.RedisError as e:
            log.info("reaper: cannot read the queues' heads: %s", e)
            return
        waiting: dict[List, str] = {}
        for key, raw in zip(self.lists, heads, strict=True):
            if raw is None:
                self.marks.add(key, now, now)
            elif (job_id := job_of(raw)) is not None:
                waiting[key] = job_id
        if not waiting:
            return
        with self.engine.connect() as conn:
            rows = conn.execute(reaper_sql.queued_at_of(list(set(waiting.values())))).all()
        published: dict[str, float] = {row[0]: float(row[1]) for row in rows}
        for key, job_id in waiting.items():
            if (at := published.get(job_id)) is not None:
                self.marks.add(key, now, at)


class AmqpCarriers:
    """Marks for RabbitMQ: a queue with no ready message has delivered everything."""

    def __init__(self, depths: Callable[[], dict[str, Any]], queues: Iterable[str] = QUEUES):
        self.depths = depths
        self.queues = list(queues)
        self.marks = Marks()

    def observe(self, now: float) -> None:
        try:
            depths = self.depths()
        except Exception as e:  # broker unreachable: nothing can be re-published anyway
            log.info("reaper: cannot read the queues' depths: %s", e)
            return
        for q, d in depths.items():
            if d.total == 0:
                for p in range(MAX_PRIORITY + 1):
                    self.marks.add((q, p), now, now)
