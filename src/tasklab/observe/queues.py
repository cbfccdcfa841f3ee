"""Queue metrics that tell the truth: every priority sub-queue, in-flight messages, consumers,
oldest job; a figure the broker cannot tell is absent (``None``, no sample), never 0.

Redis (kombu, ``sep=":"``, ``priority_steps`` 0..9) keeps queue ``q``'s messages in one list
per priority: kombu priority 0 in ``q``, priority ``k > 0`` in ``q:k``. ``LLEN q`` alone, what
most exporters report, misses every message published with a priority. Messages a worker took
but has not acknowledged yet leave the lists for the ``unacked`` hash (indexed by the
``unacked_index`` zset); they are in flight, not gone, and counted separately, per queue by
the routing key each entry keeps. Redis does not know its consumers.

tasklab publishes priority ``p`` (9 most urgent) as kombu priority ``9 - p`` on Redis (see
``celery_app.redis_priority``), so the ``priority`` label here is the tasklab priority.

RabbitMQ (the broker orders priorities itself: one number per queue): the management HTTP API
gives ready, unacked and consumers per queue, as of its last statistics tick (every 5 s by
default). Without it (plugin off, port closed, no rights), a passive ``queue.declare`` gives
ready and consumers, and the unacked count is absent. A failed API is asked again after
``MANAGEMENT_RETRY_S``, passive declares filling in meanwhile.

The age of the oldest waiting job comes from the SQL job records, not the broker: the records
are the durable truth and also cover jobs waiting in SQL while the broker is down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import sqlalchemy as sa
from prometheus_client import Gauge
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from tasklab.celery_app import MAX_PRIORITY, QUEUES, redis_priority
from tasklab.jobs.records import count_by_status, status_counts, waiting_rows
from tasklab.observe.metrics import (
    JOBS_BY_STATUS,
    QUEUE_CONSUMERS,
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
    """One queue: ``total`` messages ready (waiting), and, where the broker tells, those
    delivered and not acknowledged (``unacked``) and its ``consumers``; None: it cannot."""

    queue: str
    total: int
    by_priority: dict[int, int] = field(default_factory=dict)  # tasklab priority -> messages
    unacked: int | None = None
    consumers: int | None = None


@dataclass(frozen=True)
class QueueSnapshot:
    depths: dict[str, QueueDepth]
    unacked: int | None  # all queues; None: the broker cannot tell
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


def redis_unacked_by_queue(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Unacked messages of each of ``queues``: kombu keeps ``[message, exchange, routing
    key]`` per entry, and tasklab routes each queue by its own name. The hash holds at most
    prefetch x processes entries, so reading it whole is cheap."""
    counts: Counter[str] = Counter()
    for raw in client.hvals(REDIS_UNACKED_KEY):
        try:
            counts[str(json.loads(raw)[2])] += 1
        except (ValueError, IndexError, TypeError):
            continue  # not kombu's shape: not a message of ours
    return {queue: counts.get(queue, 0) for queue in queues}


def amqp_queue_depths(connection: Any, queues: Sequence[str]) -> dict[str, QueueDepth]:
    """Ready messages and consumers per queue by passive declare (no unacked count: absent);
    a queue that does not exist has none of either."""
    depths = {}
    for queue in queues:
        channel = connection.channel()
        try:
            _name, message_count, consumers = channel.queue_declare(queue=queue, passive=True)
            depths[queue] = QueueDepth(queue, int(message_count), consumers=int(consumers))
        except connection.channel_errors:  # 404 NOT_FOUND closes the channel
            depths[queue] = QueueDepth(queue, 0, consumers=0)
        finally:
            _close_quietly(channel)
    return depths


MANAGEMENT_PORT = 15672
MANAGEMENT_RETRY_S = 60.0
MANAGEMENT_COLUMNS = "name,messages_ready,messages_unacknowledged,consumers"


def amqp_vhost(url: str) -> str:
    """The virtual host of an AMQP URL, as kombu reads it (``//`` or none: ``/``)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def management_url(settings: Settings) -> str | None:
    """The management API's base URL for the settings' RabbitMQ; None when turned off."""
    configured = settings.amqp_management_url
    if configured == "off":
        return None
    if configured:
        return configured.rstrip("/")
    host = urlsplit(settings.effective_broker_url).hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{MANAGEMENT_PORT}"


class ManagementApi:
    """RabbitMQ's management HTTP API, logged in as the broker URL's user. After a failure
    it is not asked again for ``retry_s`` (a closed port or a missing plugin stays so)."""

    def __init__(
        self,
        base_url: str,
        broker_url: str,
        *,
        timeout_s: float,
        retry_s: float = MANAGEMENT_RETRY_S,
    ) -> None:
        parts = urlsplit(broker_url)
        auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        self.base_url = base_url
        self.vhost = amqp_vhost(broker_url)
        self.retry_s = retry_s
        import httpx  # here: a worker imports this module, and never asks the management API

        self._client = httpx.Client(base_url=base_url, auth=auth, timeout=timeout_s)
        self._errors: tuple[type[Exception], ...] = (
            httpx.HTTPError,
            ValueError,
            KeyError,
            TypeError,
        )
        self._failed_at: float | None = None

    def queue_depths(self, queues: Sequence[str]) -> dict[str, QueueDepth] | None:
        """Ready, unacked and consumers of each queue; None if the API did not answer."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_s:
            return None
        path = f"/api/queues/{quote(self.vhost, safe='')}"
        try:
            response = self._client.get(path, params={"columns": MANAGEMENT_COLUMNS})
            response.raise_for_status()
            rows = {str(row["name"]): row for row in response.json()}
        except self._errors as e:
            if self._failed_at is None:
                log.warning(
                    "RabbitMQ management API at %s: %s; unacked counts absent, "
                    "ready and consumers by passive declare",
                    self.base_url,
                    e,
                )
            self._failed_at = time.monotonic()
            return None
        self._failed_at = None
        depths = {queue: _management_depth(queue, rows.get(queue)) for queue in queues}
        if any(d is None for d in depths.values()):
            return None  # a queue without statistics yet: passive declares this round
        return {queue: d for queue, d in depths.items() if d is not None}

    def close(self) -> None:
        self._client.close()


def _management_depth(queue: str, row: Mapping[str, Any] | None) -> QueueDepth | None:
    """A queue the API lists; one it does not list does not exist: nothing in it, no one on
    it. None when its row has no ready count yet (declared since the last statistics tick);
    another figure missing from the row is absent."""
    if row is None:
        return QueueDepth(queue, 0, unacked=0, consumers=0)

    def figure(name: str) -> int | None:
        value = row.get(name)
        return int(value) if isinstance(value, int | float) else None

    ready = figure("messages_ready")
    if ready is None:
        return None
    unacked, consumers = figure("messages_unacknowledged"), figure("consumers")
    return QueueDepth(queue, ready, unacked=unacked, consumers=consumers)


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # the broker may have closed the channel already
        log.debug("channel close failed", exc_info=True)


def oldest_waiting_ages(
    engine: Engine, *, now: float | None = None, strict: bool = False
) -> dict[str, float]:
    """Seconds the oldest due job of each queue has waited since it became due; {} if no job
    table yet."""
    now = time.time() if now is None else now
    # A job waits from when it became due: its publish (or creation), or the end of its
    # countdown or retry backoff (next_attempt_at) when that is later. Not due yet: not waiting.
    published = sa.func.coalesce(_jobs.c.queued_at, _jobs.c.created_at)
    since = sa.case((_jobs.c.next_attempt_at > published, _jobs.c.next_attempt_at), else_=published)
    due = sa.or_(_jobs.c.next_attempt_at.is_(None), _jobs.c.next_attempt_at <= now)
    query = (
        sa.select(_jobs.c.queue, sa.func.min(since))
        .where(waiting_rows(), due)
        .group_by(_jobs.c.queue)
    )
    rows = _rows_if_table(engine, query, strict=strict)
    return {
        str(queue): max(0.0, now - float(oldest)) for queue, oldest in rows if oldest is not None
    }


def jobs_by_status(engine: Engine, *, strict: bool = False) -> dict[str, int]:
    """Job records per status; {} if no job table yet."""
    return status_counts(_rows_if_table(engine, count_by_status(), strict=strict))


def _rows_if_table(
    engine: Engine, query: sa.Select[Any] | sa.CompoundSelect[Any], *, strict: bool = False
) -> list[tuple[Any, ...]]:
    """The rows, [] without the table; a failing database gives [] too, or raises when
    ``strict`` (the exporter must know its figures are not fresh)."""
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(JOBS_TABLE):
                return []
            return [tuple(row) for row in conn.execute(query)]
    except SQLAlchemyError as e:  # table being migrated, database down: no data this round
        if strict:
            raise
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
        self._management: ManagementApi | None = None
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
            api = management_url(settings)
            if api is not None:
                self._management = ManagementApi(api, url, timeout_s=BROKER_TIMEOUT_S)

    def broker_depths(self) -> tuple[dict[str, QueueDepth], int | None]:
        """Each queue's figures, and the unacked messages of all of them (None: unknown)."""
        if self._redis is not None:
            depths = redis_queue_depths(self._redis, self.queues)
            unacked = redis_unacked_by_queue(self._redis, self.queues)
            depths = {q: replace(d, unacked=unacked[q]) for q, d in depths.items()}
            return depths, redis_unacked(self._redis)
        depths_or_none = self._management.queue_depths(self.queues) if self._management else None
        depths = depths_or_none or amqp_queue_depths(self._amqp, self.queues)
        counts = [d.unacked for d in depths.values()]
        total = None if any(c is None for c in counts) else sum(c or 0 for c in counts)
        return depths, total

    def snapshot(self) -> QueueSnapshot:
        depths, unacked = self.broker_depths()
        ages = oldest_waiting_ages(self.engine) if self.engine is not None else {}
        statuses = jobs_by_status(self.engine) if self.engine is not None else {}
        return QueueSnapshot(depths, unacked, ages, statuses)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._amqp is not None:
            self._amqp.release()
        if self._management is not None:
            self._management.close()


class QueueGauges:
    """Writes snapshots into the Prometheus gauges, zeroing series that disappeared and
    removing those the broker cannot tell (absent, not 0)."""

    def __init__(self) -> None:
        self._aged_queues: set[str] = set()
        self._statuses: set[str] = set()

    def record(self, snapshot: QueueSnapshot) -> None:
        for depth in snapshot.depths.values():
            QUEUE_DEPTH.labels(depth.queue).set(depth.total)
            for priority, count in depth.by_priority.items():
                QUEUE_DEPTH_BY_PRIORITY.labels(depth.queue, str(priority)).set(count)
            _set_or_remove(QUEUE_UNACKED, depth.queue, depth.unacked)
            _set_or_remove(QUEUE_CONSUMERS, depth.queue, depth.consumers)
        self._aged_queues = _set_all(
            QUEUE_OLDEST_AGE, snapshot.oldest_age_s, self._aged_queues | set(snapshot.depths)
        )
        self._statuses = _set_all(JOBS_BY_STATUS, snapshot.jobs_by_status, self._statuses)

    def forget_broker(self) -> None:
        """Drop every broker figure: a refresh that failed must not leave the last values
        served as if fresh (alerts on them would stay as they were)."""
        for gauge in (QUEUE_DEPTH, QUEUE_DEPTH_BY_PRIORITY, QUEUE_UNACKED, QUEUE_CONSUMERS):
            gauge.clear()

    def forget_database(self) -> None:
        """Drop the figures read from the job records (database unreachable)."""
        for gauge in (QUEUE_OLDEST_AGE, JOBS_BY_STATUS):
            gauge.clear()
        self._aged_queues, self._statuses = set(), set()


def _set_or_remove(gauge: Gauge, label: str, value: int | None) -> None:
    if value is not None:
        gauge.labels(label).set(value)
        return
    with contextlib.suppress(KeyError):  # never set: already absent
        gauge.remove(label)


def _set_all(gauge: Gauge, values: Mapping[str, float], known: Iterable[str]) -> set[str]:
    """Set one labelled series per key; keys seen before and missing now go to 0."""
    keys = set(known) | set(values)
    for key in keys:
        gauge.labels(key).set(values.get(key, 0))
    return keys
