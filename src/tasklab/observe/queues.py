"""Queue metrics that tell the truth: every priority sub-queue, in-flight messages, oldest job.

Redis (kombu, ``sep=":"``, ``priority_steps`` 0..9) keeps queue ``q``'s messages in one list
per priority: kombu priority 0 in ``q``, priority ``k > 0`` in ``q:k``. ``LLEN q`` alone, what
most exporters report, misses every message published with a priority. Messages a worker took
but has not acknowledged yet leave the lists for the ``unacked`` hash (indexed by the
``unacked_index`` zset); they are in flight, not gone, and counted separately.

tasklab publishes priority ``p`` (9 most urgent) as kombu priority ``9 - p`` on Redis (see
``celery_app.redis_priority``), so the ``priority`` label here is the tasklab priority.

RabbitMQ: a passive ``queue.declare`` returns the ready-message count (one number per queue; the
broker orders priorities itself, and unacked counts need the management API).

The age of the oldest waiting job comes from the SQL job records, not the broker: the records
are the durable truth and also cover jobs waiting in SQL while the broker is down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from prometheus_client import Gauge
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from tasklab.celery_app import MAX_PRIORITY, QUEUES, redis_priority
from tasklab.observe.metrics import (
    JOBS_BY_STATUS,
    QUEUE_DEPTH,
    QUEUE_DEPTH_BY_PRIORITY,
    QUEUE_OLDEST_AGE,
    QUEUE_UNACKED,
)
from tasklab.settings import Settings

# kombu Redis transport key names (kombu.transport.redis.Channel defaults, sep set by tasklab).
REDIS_PRIORITY_SEP = ":"
REDIS_UNACKED_KEY = "unacked"
REDIS_UNACKED_INDEX_KEY = "unacked_index"
# Job-record statuses that mean "waiting to start" (RETRYING only once its retry time is due).
JOBS_TABLE = "tasklab_jobs"
WAITING_STATUSES = ("PENDING", "QUEUED", "RETRYING")

log = logging.getLogger(__name__)

_jobs = sa.table(
    JOBS_TABLE,
    sa.column("status", sa.String),
    sa.column("queue", sa.String),
    sa.column("queued_at", sa.Float),
    sa.column("created_at", sa.Float),
    sa.column("next_attempt_at", sa.Float),
)


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    total: int
    by_priority: dict[int, int] = field(default_factory=dict)  # tasklab priority -> messages


@dataclass(frozen=True)
class QueueSnapshot:
    depths: dict[str, QueueDepth]
    unacked: int | None  # None: the broker cannot tell (RabbitMQ without management API)
    oldest_age_s: dict[str, float]
    jobs_by_status: dict[str, int]


def redis_list_key(queue: str, kombu_priority: int) -> str:
    return f"{queue}{REDIS_PRIORITY_SEP}{kombu_priority}" if kombu_priority else queue


def redis_queue_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, QueueDepth]:
    """LLEN of every priority sub-list of every queue, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for kombu_priority in range(MAX_PRIORITY + 1):
            pipe.llen(redis_list_key(queue, kombu_priority))
    lengths = iter(pipe.execute())
    depths = {}
    for queue in queues:
        by_priority = {redis_priority(k): int(next(lengths)) for k in range(MAX_PRIORITY + 1)}
        depths[queue] = QueueDepth(queue, sum(by_priority.values()), by_priority)
    return depths


def redis_unacked(client: redis.Redis) -> int:
    """Messages delivered to a consumer and not acknowledged yet (all queues)."""
    return int(client.hlen(REDIS_UNACKED_KEY))


def amqp_queue_depths(connection: Any, queues: Sequence[str]) -> dict[str, QueueDepth]:
    """Ready messages per queue by passive declare; a queue that does not exist counts 0."""
    depths = {}
    for queue in queues:
        channel = connection.channel()
        try:
            _name, message_count, _consumers = channel.queue_declare(queue=queue, passive=True)
            depths[queue] = QueueDepth(queue, int(message_count))
        except connection.channel_errors:  # 404 NOT_FOUND closes the channel
            depths[queue] = QueueDepth(queue, 0)
        finally:
            _close_quietly(channel)
    return depths


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # the broker may have closed the channel already
        log.debug("channel close failed", exc_info=True)


def oldest_waiting_ages(engine: Engine, *, now: float | None = None) -> dict[str, float]:
    """Seconds the oldest waiting job of each queue has waited; {} if no job table yet."""
    now = time.time() if now is None else now
    since = sa.case(
        (
            _jobs.c.status == "RETRYING",
            sa.func.coalesce(_jobs.c.next_attempt_at, _jobs.c.queued_at),
        ),
        else_=sa.func.coalesce(_jobs.c.queued_at, _jobs.c.created_at),
    )
    due = sa.or_(
        _jobs.c.status != "RETRYING",
        _jobs.c.next_attempt_at.is_(None),
        _jobs.c.next_attempt_at <= now,
    )
    query = (
        sa.select(_jobs.c.queue, sa.func.min(since))
        .where(_jobs.c.status.in_(WAITING_STATUSES), due)
        .group_by(_jobs.c.queue)
    )
    rows = _rows_if_table(engine, query)
    return {
        str(queue): max(0.0, now - float(oldest)) for queue, oldest in rows if oldest is not None
    }


def jobs_by_status(engine: Engine) -> dict[str, int]:
    """Job records per status; {} if no job table yet."""
    query = sa.select(_jobs.c.status, sa.func.count()).group_by(_jobs.c.status)
    return {str(status): int(count) for status, count in _rows_if_table(engine, query)}


def _rows_if_table(engine: Engine, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(JOBS_TABLE):
                return []
            return [tuple(row) for row in conn.execute(query)]
    except SQLAlchemyError as e:  # table being migrated, database down: no data this round
        log.warning("job-table query failed: %s", type(e).__name__)
        return []


BROKER_TIMEOUT_S = 2.0


class QueueProbe:
    """Reads queue depths from the broker and waiting-job figures from SQL, on demand."""

    def __init__(
        self, settings: Settings, *, engine: Engine | None = None, queues: Sequence[str] = QUEUES
    ) -> None:
        self.queues = tuple(queues)
        self.engine = engine
        self._redis: redis.Redis | None = None
        self._amqp: Any = None  # kombu.Connection
        url = settings.effective_broker_url
        if settings.broker_is_redis:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
            )
        else:
            from kombu.connection import Connection

            self._amqp = Connection(  # type: ignore[no-untyped-call]
                url, connect_timeout=BROKER_TIMEOUT_S
            )

    def snapshot(self) -> QueueSnapshot:
        if self._redis is not None:
            depths = redis_queue_depths(self._redis, self.queues)
            unacked: int | None = redis_unacked(self._redis)
        else:
            depths, unacked = amqp_queue_depths(self._amqp, self.queues), None
        ages = oldest_waiting_ages(self.engine) if self.engine is not None else {}
        statuses = jobs_by_status(self.engine) if self.engine is not None else {}
        return QueueSnapshot(depths, unacked, ages, statuses)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._amqp is not None:
            self._amqp.release()


class QueueGauges:
    """Writes snapshots into the Prometheus gauges, zeroing series that disappeared."""

    def __init__(self) -> None:
        self._aged_queues: set[str] = set()
        self._statuses: set[str] = set()

    def record(self, snapshot: QueueSnapshot) -> None:
        for depth in snapshot.depths.values():
            QUEUE_DEPTH.labels(depth.queue).set(depth.total)
            for priority, count in depth.by_priority.items():
                QUEUE_DEPTH_BY_PRIORITY.labels(depth.queue, str(priority)).set(count)
        if snapshot.unacked is not None:
            QUEUE_UNACKED.set(snapshot.unacked)
        self._aged_queues = _set_all(
            QUEUE_OLDEST_AGE, snapshot.oldest_age_s, self._aged_queues | set(snapshot.depths)
        )
        self._statuses = _set_all(JOBS_BY_STATUS, snapshot.jobs_by_status, self._statuses)


def _set_all(gauge: Gauge, values: Mapping[str, float], known: Iterable[str]) -> set[str]:
    """Set one labelled series per key; keys seen before and missing now go to 0."""
    keys = set(known) | set(values)
    for key in keys:
        gauge.labels(key).set(values.get(key, 0))
    return keys
