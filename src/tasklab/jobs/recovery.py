"""The reaper: puts back into the broker every job that should be there and is not.

Each tick:
1. STARTED jobs whose lease expired (their worker died) go back to PENDING, or DEAD on their
   last attempt.
2. PENDING jobs past a short grace period (the broker refused them, the local executor was full,
   or the lease just expired) are published.
3. QUEUED/RETRYING jobs older than ``requeue_after_s`` are re-published when their queue in the
   broker is empty (their message cannot be waiting there), and all of them at once when the
   broker was restarted empty (a marker key in Redis vanished).
Duplicate messages are harmless: a delivery only runs if its claim (a conditional UPDATE) wins.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis
from sqlalchemy import Engine

from tasklab.celery_app import QUEUES
from tasklab.database import writing
from tasklab.errors import BrokerUnavailable
from tasklab.jobs import store
from tasklab.jobs.publisher import Publisher
from tasklab.observe import metrics
from tasklab.settings import Settings

log = logging.getLogger("tasklab.jobs.reaper")
EPOCH_KEY = "tasklab:broker-epoch"
BATCH = 500


class Reaper:
    def __init__(self, settings: Settings, engine: Engine, publisher: Publisher) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.pending_grace_s = max(2.0, 2 * settings.publish_timeout_s)
        self._epoch: str | None = None
        self._redis: redis.Redis | None = None
        if settings.broker_is_redis:
            self._redis = redis.Redis.from_url(
                settings.effective_broker_url,
                socket_timeout=settings.publish_timeout_s,
                socket_connect_timeout=settings.publish_timeout_s,
            )

    def tick(self) -> dict[str, int]:
        now = time.time()
        counts = {"lease_expired": self._release_expired(now)}
        flushed = self._broker_was_flushed()
        empty = self._empty_queues()
        queued_before = now if flushed else now - self.settings.requeue_after_s
        counts.update({"unpublished": 0, "message_lost": 0})
        while True:  # after a flush every queued job must go back, batch after batch
            batch = self._publish_stranded(now, queued_before, None if flushed else empty)
            for key, n in batch.items():
                counts[key] += n
            if sum(batch.values()) < BATCH:
                return counts

    def _release_expired(self, now: float) -> int:
        released = 0
        # Read first, outside the write gate: almost every tick finds nothing to release.
        with self.engine.connect() as conn:
            expired = conn.execute(store.expired_leases(now, BATCH)).all()
        if not expired:
            return 0
        with writing(self.engine) as conn:
            for row in expired:  # each release is fenced: a renewal since the read wins
                dead = row.attempt >= row.max_attempts
                n = conn.execute(
                    store.release_expired(row.id, row.attempt, now, dead=dead)
                ).rowcount
                if n and dead:
                    metrics.JOB_DEAD_LETTERS.labels(row.task, row.queue).inc()
                    metrics.JOBS_FINISHED.labels(row.task, row.queue, "dead").inc()
                released += n
        if released:
            metrics.JOB_RECOVERIES.labels("lease_expired").inc(released)
            log.warning("reaper: %d job(s) had an expired lease (worker lost)", released)
        return released

    def _broker_was_flushed(self) -> bool:
        """True once after the Redis broker lost its data (restarted empty, or flushed)."""
        if self._redis is None:
            return False
        try:
            current = self._redis.get(EPOCH_KEY)
            if current is None:
                self._redis.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
                current = self._redis.get(EPOCH_KEY)
        except redis.RedisError:
            return False
        value = current.decode() if isinstance(current, bytes) else str(current)
        flushed = self._epoch is not None and value != self._epoch
        self._epoch = value
        if flushed:
            log.warning("reaper: the broker restarted empty; re-publishing queued jobs")
        return flushed

    def _empty_queues(self) -> list[str]:
        if self._redis is None:
            return self._empty_amqp_queues()
        try:
            pipe = self._redis.pipeline(transaction=False)
            for q in QUEUES:
                for key in _priority_keys(q):
                    pipe.llen(key)
            lengths = pipe.execute()
        except redis.RedisError:
            return []
        per_queue = len(lengths) // len(QUEUES)
        return [
            q
            for i, q in enumerate(QUEUES)
            if sum(lengths[i * per_queue : (i + 1) * per_queue]) == 0
        ]

    def _empty_amqp_queues(self) -> list[str]:
        """RabbitMQ: ready-message counts by passive declare (unacked ones are not counted,
        so a job reserved by a live worker may be re-published: the claim skips the copy)."""
        from tasklab.observe.queues import amqp_queue_depths

        try:
            with self.publisher.app.connection_for_read() as conn:
                depths = amqp_queue_depths(conn, QUEUES)
        except Exception:  # broker unreachable: nothing can be re-published anyway
            return []
        return [q for q, d in depths.items() if d.total == 0]

    def _publish_stranded(
        self, now: float, queued_before: float, empty: list[str] | None
    ) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                store.stranded(
                    pending_before=now - self.pending_grace_s,
                    queued_before=queued_before,
                    limit=BATCH,
                    queues=empty,
                )
            ).all()
        counts = {"unpublished": 0, "message_lost": 0}
        for row in rows:
            countdown = max(0.0, (row.next_attempt_at or 0) - now)
            try:
                message_id = self.publisher.publish(
                    row.task, row.id, queue=row.queue, priority=row.priority, countdown_s=countdown
                )
            except BrokerUnavailable:
                break
            with writing(self.engine) as conn:
                conn.execute(store.mark_published(row.id, message_id, time.time()))
            reason = "unpublished" if row.status == "PENDING" else "message_lost"
            counts[reason] += 1
        if counts["message_lost"]:
            metrics.JOB_RECOVERIES.labels("message_lost").inc(counts["message_lost"])
            log.warning(
                "reaper: re-published %d job(s) whose message was lost", counts["message_lost"]
            )
        if counts["unpublished"]:
            metrics.JOB_RECOVERIES.labels("unpublished").inc(counts["unpublished"])
            log.info("reaper: published %d job(s) that were waiting in SQL", counts["unpublished"])
        return counts

    def purge(self) -> int:
        before = time.time() - self.settings.job_retention_days * 86400
        with writing(self.engine) as conn:
            return int(conn.execute(store.purge_finished(before)).rowcount)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def _priority_keys(queue: str) -> list[str]:
    # kombu's Redis transport keeps priority p > 0 of queue q in the list "q:p" (sep ":").
    return [queue, *(f"{queue}:{p}" for p in range(1, 10))]


class ReaperThread(threading.Thread):
    """Runs ``Reaper.tick`` every ``reaper_interval_s`` until stopped."""

    def __init__(self, reaper: Reaper, interval_s: float) -> None:
        super().__init__(name="tasklab-reaper", daemon=True)
        self.reaper = reaper
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.reaper.tick()
            except Exception:  # the reaper must outlive a DB or broker hiccup
                log.exception("reaper tick failed")

    def stop(self) -> None:
        self._stop_event.set()


def start_reaper(settings: Settings, engine: Engine, publisher: Publisher) -> ReaperThread:
    thread = ReaperThread(Reaper(settings, engine, publisher), settings.reaper_interval_s)
    thread.start()
    return thread
