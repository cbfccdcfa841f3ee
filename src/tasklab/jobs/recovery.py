"""The reaper: puts back into the broker every job that should be there and is not.

Each tick:
1. STARTED jobs whose lease expired (their worker died) go back to PENDING, or DEAD on their
   last attempt (CANCELLED if a cancel was asked for).
2. PENDING jobs past a short grace period (never published: the relay's process died or the
   broker refused them; or just taken back from a lost worker) are published.
3. QUEUED/RETRYING jobs whose message left the broker's queue more than ``requeue_after_s``
   ago without the job starting (tasklab.jobs.carriers) are published again, whatever the
   backlog behind them; all of them at once when the broker restarted empty (a marker key in
   Redis vanished).

Jobs go out in batches (bundles, one round trip). Every worker runs a reaper: each takes the
jobs it publishes with one conditional UPDATE first, so two reapers never publish the same
job twice. Duplicate messages are harmless anyway: a delivery runs only if its claim wins.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import redis
from sqlalchemy import Engine

from tasklab.celery_app import MAX_PRIORITY, QUEUES
from tasklab.database import fork_guard, writing
from tasklab.errors import BrokerUnavailable, UnknownTask
from tasklab.jobs import hooks, reaper_sql, store
from tasklab.jobs.carriers import AmqpCarriers, RedisCarriers
from tasklab.jobs.publisher import Outgoing, Publisher
from tasklab.jobs.records import JobStatus
from tasklab.jobs.registry import get_spec
from tasklab.observe import metrics
from tasklab.observe.profiling import profiled
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
        self._flushed_before = 0.0  # jobs published before this lost their messages
        self._redis: redis.Redis | None = None
        self.carriers: RedisCarriers | AmqpCarriers
        # tasklab's queues and the extra ones named in full (a pattern cannot be listed)
        self.queues = (*QUEUES, *(q for q in settings.extra_queues if "*" not in q))
        if settings.broker_is_redis:
            self._redis = redis.Redis.from_url(
                settings.effective_broker_url,
                socket_timeout=settings.publish_timeout_s,
                socket_connect_timeout=settings.publish_timeout_s,
            )
            self.carriers = RedisCarriers(self._redis, engine, queues=self.queues)
        else:
            self.carriers = AmqpCarriers(self._amqp_depths, queues=self.queues)

    @profiled(threshold_s=2.0, name="tasklab.reaper.tick")  # a slow tick is logged
    def tick(self) -> dict[str, int]:
        now = time.time()
        counts = {"lease_expired": self._release_expired(now)}
        self._check_epoch()
        self.carriers.observe(now)
        left = self.carriers.marks.settled(now - self.settings.requeue_after_s)
        if self._flushed_before:
            left = {
                key: max(left.get(key, 0.0), self._flushed_before)
                for key in {*left, *((q, p) for q in self.queues for p in range(MAX_PRIORITY + 1))}
            }
        counts.update({"unpublished": 0, "message_lost": 0})
        deadline = time.monotonic() + self.settings.reaper_interval_s
        while True:  # after an outage or a flush, batch after batch
            found, batch = self._publish_stranded(now, left)
            for key, n in batch.items():
                counts[key] += n
            if found < BATCH or time.monotonic() > deadline:
                return counts

    def finish_old_cancels(self) -> None:
        try:
            with writing(self.engine) as conn:
                rows = conn.execute(reaper_sql.finish_cancel_requested(time.time())).all()
                for row in rows:
                    hooks.after_change(conn, row)
                n = len(rows)
        except Exception:  # a reaper must start even if the database hiccups
            log.exception("reaper: could not finish jobs left with a cancel")
            return
        if n:
            log.warning("reaper: %d waiting job(s) had a cancel asked for: now CANCELLED", n)

    def _release_expired(self, now: float) -> int:
        released = 0
        # Read first, outside the write gate: almost every tick finds nothing to release.
        with self.engine.connect() as conn:
            expired = conn.execute(reaper_sql.expired_leases(BATCH)).all()
        if not expired:
            return 0
        with writing(self.engine) as conn:
            for row in expired:  # each release is fenced: a renewal since the read wins
                dead = row.attempt >= row.max_attempts
                changed = conn.execute(
                    reaper_sql.release_expired(row.id, row.attempt, now, dead=dead)
                ).first()
                if changed is None:
                    continue
                conn.execute(
                    store.record_attempt(
                        row.id,
                        row.attempt,
                        outcome="lost",
                        ran_on=row.lease_owner,
                        started_at=row.started_at,
                        now=now,
                        error="its worker was lost (the lease expired)",
                    )
                )
                hooks.after_change(conn, changed)
                ended = changed.status
                released += 1
                if ended == JobStatus.DEAD.value:
                    metrics.JOB_DEAD_LETTERS.labels(row.task, row.queue).inc()
                    metrics.JOBS_FINISHED.labels(row.task, row.queue, "dead").inc()
                elif ended == JobStatus.CANCELLED.value:
                    metrics.JOBS_FINISHED.labels(row.task, row.queue, "cancelled").inc()
        if released:
            metrics.JOB_RECOVERIES.labels("lease_expired").inc(released)
            log.warning("reaper: %d job(s) had an expired lease (worker lost)", released)
        return released

    def _check_epoch(self) -> None:
        """Notice that the Redis broker lost its data (restarted empty, or flushed): every job
        published before the new epoch began lost its message."""
        if self._redis is None:
            return
        try:
            current = self._redis.get(EPOCH_KEY)
            if current is None:
                self._redis.set(EPOCH_KEY, f"{uuid.uuid4().hex}:{time.time()!r}", nx=True)
                current = self._redis.get(EPOCH_KEY)
        except redis.RedisError:
            return
        value = current.decode() if isinstance(current, bytes) else str(current)
        if self._epoch is not None and value != self._epoch:
            began = _epoch_start(value)
            log.warning("reaper: the broker restarted empty; re-publishing queued jobs")
            self._flushed_before = max(self._flushed_before, began)
        self._epoch = value

    def _amqp_depths(self) -> dict[str, Any]:
        """RabbitMQ: ready-message counts by passive declare (unacked ones are not counted,
        so a job reserved by a live worker may be re-published: the claim skips the copy)."""
        from tasklab.observe.queues import amqp_queue_depths

        with self.publisher.app.connection_for_read() as conn:
            return amqp_queue_depths(conn, self.queues)

    def _publish_stranded(
        self, now: float, left: dict[tuple[str, int], float]
    ) -> tuple[int, dict[str, int]]:
        """One batch: (jobs found, counts by reason of those this reaper published)."""
        counts = {"unpublished": 0, "message_lost": 0}
        with self.engine.connect() as conn:
            rows = conn.execute(
                reaper_sql.stranded(
                    pending_before=now - self.pending_grace_s,
                    due_before=now - self.settings.requeue_after_s,
                    left_broker=left,
                    limit=BATCH,
                )
            ).all()
        if not rows:
            return 0, counts
        before = max(left.values(), default=0.0)
        taken_at = time.time()
        with writing(self.engine) as conn:
            won = set(
                conn.execute(
                    reaper_sql.take_for_republish([r.id for r in rows], before=before, now=taken_at)
                ).scalars()
            )
        mine = [r for r in rows if r.id in won]
        if mine and not self._publish(mine, now, taken_at):
            return len(rows), counts
        for row in mine:
            counts["unpublished" if row.status == "PENDING" else "message_lost"] += 1
        self._count(counts)
        return len(rows), counts

    def _publish(self, rows: list[Any], now: float, taken_at: float) -> bool:
        outgoing = [
            Outgoing(
                r.task,
                r.id,
                r.queue,
                r.priority,
                countdown_s=max(0.0, (r.next_attempt_at or 0) - now),
                bundle=_bundles(r.task),
            )
            for r in rows
        ]
        try:
            self.publisher.publish_many(outgoing)
        except BrokerUnavailable as e:
            with writing(self.engine) as conn:
                conn.execute(reaper_sql.untake([r.id for r in rows], taken_at=taken_at))
            log.info("reaper: %d job(s) wait in SQL for the broker: %s", len(rows), e)
            return False
        return True

    @staticmethod
    def _count(counts: dict[str, int]) -> None:
        if counts["message_lost"]:
            metrics.JOB_RECOVERIES.labels("message_lost").inc(counts["message_lost"])
            log.warning(
                "reaper: re-published %d job(s) whose message was lost", counts["message_lost"]
            )
        if counts["unpublished"]:
            metrics.JOB_RECOVERIES.labels("unpublished").inc(counts["unpublished"])
            log.info("reaper: published %d job(s) that were waiting in SQL", counts["unpublished"])

    def purge(self) -> int:
        before = time.time() - self.settings.job_retention_days * 86400
        with writing(self.engine) as conn:
            purged = int(conn.execute(reaper_sql.purge_finished(before)).rowcount)
            conn.execute(reaper_sql.purge_attempts(before))
            return purged

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def _epoch_start(value: str) -> float:
    """When an epoch began (its value is "<uuid>:<time>"); now if it does not say."""
    try:
        return float(value.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return time.time()


def _bundles(task: str) -> bool:
    try:
        return get_spec(task).bundles
    except UnknownTask:  # declared in a module this process did not import
        return False


class ReaperThread(threading.Thread):
    """Runs ``Reaper.tick`` every ``reaper_interval_s`` until stopped."""

    def __init__(self, reaper: Reaper, interval_s: float) -> None:
        super().__init__(name="tasklab-reaper", daemon=True)
        self.reaper = reaper
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        with fork_guard():  # a worker forks pool processes meanwhile (see database.py)
            self.reaper.finish_old_cancels()
        while not self._stop_event.wait(self.interval_s):
            try:
                with fork_guard():
                    self.reaper.tick()
            except Exception:  # the reaper must outlive a DB or broker hiccup
                log.exception("reaper tick failed")

    def stop(self) -> None:
        self._stop_event.set()


def start_reaper(settings: Settings, engine: Engine, publisher: Publisher) -> ReaperThread:
    thread = ReaperThread(Reaper(settings, engine, publisher), settings.reaper_interval_s)
    thread.start()
    return thread
