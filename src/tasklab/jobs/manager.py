"""``JobManager``: submit, inspect, cancel, retry and wait for durable jobs (sync and async).

A job is committed to SQL before ``submit`` returns. Then it is published to the broker (by
the relay thread for ``submit``, awaited by ``asubmit``); if the broker does not take it, it
runs in a bounded local executor (via=local), or stays PENDING for the reaper to publish when
the broker is back. Either way it is never lost.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import fnmatch
import functools
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklab.celery_app import MAX_PRIORITY, QUEUES
from tasklab.coalesce import Coalescer
from tasklab.database import (
    dispose_all,
    make_async_engine,
    make_engine,
    one_statement,
    relaxed_writes,
    writing,
)
from tasklab.errors import (
    BrokerUnavailable,
    JobError,
    JobNotFound,
    JobStateError,
    JobTimeout,
    UnknownQueue,
)
from tasklab.jobs import hooks, store
from tasklab.jobs.execution import Executor
from tasklab.jobs.fallback import LocalExecutor
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.prepared import PreparedJob, submitted_job
from tasklab.jobs.publisher import Outgoing, Publisher
from tasklab.jobs.records import FINAL, Job, JobStatus, count_by_status, status_counts
from tasklab.jobs.registry import JobSpec, get_spec
from tasklab.jobs.relay import Relay
from tasklab.jobs.sqlite_writes import HotWrites
from tasklab.observe import metrics
from tasklab.settings import Settings

log = logging.getLogger("tasklab.jobs")
MAX_PAGE_SIZE = 100
MARK_EVERY_S = 0.1  # the relay's QUEUED marks: one write per interval while it publishes
MARK_CHUNK = 500  # job ids per marking statement


class JobManager:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        publisher: Publisher | None = None,
        local_fallback: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings)
        self._async_engine = async_engine
        self.publisher = publisher or Publisher(settings)
        self.local = LocalExecutor(
            workers=settings.local_workers if local_fallback else 0,
            queue_max=settings.local_queue_max,
        )
        self._single = one_statement(self.engine)  # the insert of submit()
        self._hot = HotWrites(self.engine) if self.engine.dialect.name == "sqlite" else None
        self._dispatches: Coalescer[tuple[JobSpec, dict[str, Any], float], str] = Coalescer(
            self._dispatch_batch
        )
        self._unmarked: builtins.list[str] = []  # published by the relay, not marked yet
        self._unmarked_lock = threading.Lock()
        self._relay: Relay[tuple[JobSpec, dict[str, Any], float]] = Relay(
            functools.partial(self._dispatch_submitted, defer_mark=True),
            linger_s=settings.relay_linger_ms / 1000,
            max_batch=max(256, settings.bundle_max),
            exit_flush_s=2 * settings.publish_timeout_s,
            settle=self._write_marks,
            settle_every_s=MARK_EVERY_S,
        )
        self._leases = LeaseKeeper(self.engine)
        self._executor = Executor(
            self.engine,
            lease_owner=f"local:{socket.gethostname()}:{os.getpid()}",
            via="local",
            default_lease_s=settings.lease_s,
            leases=self._leases,
            reschedule=self.publisher.reschedule,
        )
        self._owns_async_engine = async_engine is None
        self._known_queues: set[str] = set()
        _live.add(self)

    def _after_fork_in_child(self) -> None:
        """A forked child gets its own connections and threads: sockets and SQLite handles
        shared with the parent would interleave their bytes, and threads do not survive a
        fork (the relay and the lease keeper restart themselves)."""
        dispose_all(self.engine, close=False)
        self._unmarked = []  # the parent's to write
        self._unmarked_lock = threading.Lock()
        if self._owns_async_engine:
            self._async_engine = None
        self.local = LocalExecutor(
            workers=self.local.workers, queue_max=self.settings.local_queue_max
        )
        if self.publisher._app is not None:
            self.publisher._app._after_fork()

    @property
    def async_engine(self) -> AsyncEngine:
        if self._async_engine is None:
            self._async_engine = make_async_engine(self.settings)
        return self._async_engine

    # --- submit -----------------------------------------------------------------------------
    def _prepare(
        self,
        task: str | JobSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        queue: str | None,
        priority: int | None,
        idempotency_key: str | None,
        owner: str | None,
        countdown_s: float,
    ) -> tuple[JobSpec, dict[str, Any]]:
        spec = get_spec(task)
        prio = spec.priority if priority is None else priority
        if not isinstance(prio, int) or not 0 <= prio <= MAX_PRIORITY:
            raise JobError(f"priority must be an int 0..{MAX_PRIORITY}, got {prio!r}")
        if countdown_s < 0:
            raise JobError("countdown_s must be >= 0")
        queue = queue or spec.queue
        if queue not in self._known_queues:  # a match is remembered: this runs per submit
            known = (*QUEUES, *self.settings.extra_queues)
            if not any(fnmatch.fnmatchcase(queue, k) for k in known):  # nobody consumes it
                raise UnknownQueue(queue, known)
            if len(self._known_queues) < 1024:
                self._known_queues.add(queue)
        now = time.time()
        values = {
            "job_id": store.new_job_id(),
            "task": spec.name,
            "args": list(args),
            "kwargs": kwargs,
            "queue": queue,
            "priority": prio,
            "owner": owner or "",
            "idempotency_key": idempotency_key,
            "max_attempts": spec.retry.max_attempts,
            "now": now,
            "next_attempt_at": now + countdown_s if countdown_s else None,
            "status": JobStatus.PENDING,
            "message_id": uuid.uuid4().hex,
        }
        return spec, values

    def prepare(
        self,
        task: str | JobSpec,
        *args: Any,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
        countdown_s: float = 0,
        **kwargs: Any,
    ) -> PreparedJob:
        """First half of a submit inside your own transaction: execute ``prepared.insert``
        with your connection (so your rows and the job commit together), commit, then call
        ``dispatch``/``adispatch``. If the process dies between commit and dispatch, the
        reaper publishes the job (it stays PENDING until a message carries it)."""
        spec, values = self._prepare(
            task,
            args,
            kwargs,
            queue=queue,
            priority=priority,
            idempotency_key=idempotency_key,
            owner=owner,
            countdown_s=countdown_s,
        )
        return PreparedJob(spec, values, countdown_s)

    def dispatch(self, prepared: PreparedJob) -> Job:
        """Second half: publish (or fall back) a prepared job whose row is committed."""
        batch = [(prepared.spec, prepared.values, prepared.countdown_s)]
        via = self._dispatch_submitted(batch)[0]
        if isinstance(via, BaseException):
            raise via
        return submitted_job(prepared.values, via)

    async def adispatch(self, prepared: PreparedJob) -> Job:
        via = await self._adispatch(prepared.spec, prepared.values, prepared.countdown_s)
        return submitted_job(prepared.values, via)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every job ``submit`` returned has been handed to the broker or to the
        local fallback (the relay publishes behind ``submit``); False on timeout."""
        return self._relay.flush(timeout_s)

    def submit(
        self,
        task: str | JobSpec,
        *args: Any,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
        countdown_s: float = 0,
        **kwargs: Any,
    ) -> Job:
        """Record the job durably, then hand it to the broker (or the local fallback)."""
        job = self.prepare(
            task,
            *args,
            queue=queue,
            priority=priority,
            idempotency_key=idempotency_key,
            owner=owner,
            countdown_s=countdown_s,
            **kwargs,
        )
        owner_key = job.values["owner"]
        if idempotency_key is not None and (found := self._by_key(owner_key, idempotency_key)):
            return found
        try:
            self._insert(job)
        except IntegrityError:  # a concurrent submit with the same key won the insert
            if idempotency_key is None or not (found := self._by_key(owner_key, idempotency_key)):
                raise
            return found
        # Durable now; published by the relay thread with the jobs submitted meanwhile.
        self._relay.put((job.spec, job.values, job.countdown_s))
        return submitted_job(job.values, "broker", published=False)

    async def asubmit(
        self,
        task: str | JobSpec,
        *args: Any,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
        countdown_s: float = 0,
        **kwargs: Any,
    ) -> Job:
        job = self.prepare(
            task,
            *args,
            queue=queue,
            priority=priority,
            idempotency_key=idempotency_key,
            owner=owner,
            countdown_s=countdown_s,
            **kwargs,
        )
        owner_key = job.values["owner"]
        if idempotency_key is not None and (
            found := await self._aby_key(owner_key, idempotency_key)
        ):
            return found
        try:
            if self.engine.dialect.name == "sqlite":  # a write waits for the gate: off the loop
                await asyncio.to_thread(self._insert, job)
            else:
                async with self.async_engine.begin() as conn:
                    await conn.execute(*job.insert)
        except IntegrityError:
            if idempotency_key is None or not (
                found := await self._aby_key(owner_key, idempotency_key)
            ):
                raise
            return found
        return await self.adispatch(job)

    def _insert(self, job: PreparedJob) -> None:
        self._write_one(job.insert)

    def _write_one(self, prepared: store.Prepared, *, relaxed: bool = False) -> None:
        """One statement in its own transaction (on SQLite, on the DBAPI connection; on
        PostgreSQL in autocommit, ``relaxed`` without waiting for the WAL flush)."""
        if self._hot is not None:
            self._hot.run(prepared)
            return
        with writing(relaxed_writes(self.engine) if relaxed else self._single) as conn:
            conn.execute(*prepared)

    def _dispatch(self, spec: JobSpec, values: dict[str, Any], countdown_s: float) -> str:
        """Publish; on failure mark PENDING and try the local executor. Returns via."""
        outcome = self._dispatch_many([(spec, values, countdown_s)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _dispatch_many(
        self,
        batch: builtins.list[tuple[JobSpec, dict[str, Any], float]],
        *,
        defer_mark: bool = False,
    ) -> builtins.list[str | BaseException]:
        """``_dispatch`` for several jobs, published in one round trip (see publish_many),
        then recorded as QUEUED in one write: a PENDING job is one no message carries yet,
        which the reaper publishes if this process dies first. ``defer_mark`` (the relay):
        the mark waits for the relay's next settle, at most MARK_EVERY_S later, far inside
        the reaper's grace for PENDING jobs. One outcome per job: its via, or the error of
        its fallback (a database error)."""
        outgoing = [
            Outgoing(
                spec.name,
                values["job_id"],
                values["queue"],
                values["priority"],
                countdown_s,
                values.get("message_id"),
                bundle=spec.bundles,
            )
            for spec, values, countdown_s in batch
        ]
        try:
            message_ids = self.publisher.publish_many(outgoing)
        except BrokerUnavailable as e:
            outcomes: builtins.list[str | BaseException] = []
            for spec, values, delay in batch:
                try:
                    outcomes.append(self._fall_back(spec, values["job_id"], delay, e))
                except Exception as err:
                    outcomes.append(err)
            return outcomes
        del message_ids  # a delivery's claim records the message it runs from
        published = [v["job_id"] for _, v, _ in batch]
        if defer_mark:
            with self._unmarked_lock:
                self._unmarked.extend(published)
        else:
            self._mark_queued(published)
        return ["broker"] * len(batch)

    def _write_marks(self) -> None:
        """The relay's settle: every job it published since the last one, marked QUEUED."""
        with self._unmarked_lock:
            published, self._unmarked = self._unmarked, []
        for start in range(0, len(published), MARK_CHUNK):
            self._mark_queued(published[start : start + MARK_CHUNK])

    def _mark_queued(self, job_ids: builtins.list[str]) -> None:
        try:  # lost in a database crash: a PENDING job the reaper publishes again (harmless)
            self._write_one(store.mark_sent(job_ids, time.time()), relaxed=True)
        except Exception as e:  # published: the claim does not need the mark, the reaper
            log.warning("relay: %d job(s) published but not marked QUEUED: %s", len(job_ids), e)

    def _dispatch_submitted(
        self,
        batch: builtins.list[tuple[JobSpec, dict[str, Any], float]],
        *,
        defer_mark: bool = False,
    ) -> builtins.list[str | BaseException]:
        """``_dispatch_many`` for new jobs, counted in jobs_submitted_total by via."""
        outcomes = self._dispatch_many(batch, defer_mark=defer_mark)
        counted: collections.Counter[tuple[str, str, str]] = collections.Counter(
            (spec.name, values["queue"], via)
            for (spec, values, _), via in zip(batch, outcomes, strict=True)
            if isinstance(via, str)
        )
        for labels, n in counted.items():  # a batch is mostly one task: one update
            metrics.JOBS_SUBMITTED.labels(*labels).inc(n)
        return outcomes

    def _fall_back(
        self, spec: JobSpec, job_id: str, countdown_s: float, e: BrokerUnavailable
    ) -> str:
        with writing(self.engine) as conn:
            conn.execute(store.mark_pending(job_id, via="local"))
        if countdown_s == 0 and self.local.try_run(
            spec.name, lambda: self._executor.run(spec, job_id).status
        ):
            log.info("job %s (%s) runs locally: %s", job_id, spec.name, e)
        else:
            log.info("job %s (%s) waits in SQL for the broker: %s", job_id, spec.name, e)
        return "local"

    def _by_key(self, owner: str, key: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(store.select_by_idempotency(owner, key)).first()
        return Job.from_row(row) if row else None

    async def _adispatch(self, spec: JobSpec, values: dict[str, Any], countdown_s: float) -> str:
        via: str = await self._dispatches.submit((spec, values, countdown_s))
        return via

    async def _dispatch_batch(
        self, batch: builtins.list[tuple[JobSpec, dict[str, Any], float]]
    ) -> builtins.list[str | BaseException]:
        # Publishing is blocking kombu I/O (bounded by publish_timeout_s): keep it off the
        # loop, and make one thread hop for the jobs dispatched meanwhile (see Coalescer).
        return await asyncio.to_thread(self._dispatch_submitted, batch)

    async def _aby_key(self, owner: str, key: str) -> Job | None:
        async with self.async_engine.connect() as conn:
            row = (await conn.execute(store.select_by_idempotency(owner, key))).first()
        return Job.from_row(row) if row else None

    # --- read -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(*store.select_job(job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        return Job.from_row(row)

    async def aget(self, job_id: str) -> Job:
        async with self.async_engine.connect() as conn:
            row = (await conn.execute(*store.select_job(job_id))).first()
        if row is None:
            raise JobNotFound(job_id)
        return Job.from_row(row)

    def list(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        task: str | None = None,
        page: int = 1,
        page_size: int = 20,
    ) -> tuple[builtins.list[Job], int]:
        rows_stmt, total_stmt = store.select_page(
            owner=owner,
            status=_status_filter(status),
            task=task,
            page=max(1, page),
            page_size=_page_size(page_size),
        )
        with self.engine.connect() as conn:
            rows = conn.execute(rows_stmt).all()
            total = conn.execute(total_stmt).scalar_one()
        return [Job.from_row(r) for r in rows], int(total)

    async def alist(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        task: str | None = None,
        page: int = 1,
        page_size: int = 20,
    ) -> tuple[builtins.list[Job], int]:
        rows_stmt, total_stmt = store.select_page(
            owner=owner,
            status=_status_filter(status),
            task=task,
            page=max(1, page),
            page_size=_page_size(page_size),
        )
        async with self.async_engine.connect() as conn:
            rows = (await conn.execute(rows_stmt)).all()
            total = (await conn.execute(total_stmt)).scalar_one()
        return [Job.from_row(r) for r in rows], int(total)

    # --- control ----------------------------------------------------------------------------
    def cancel(self, job_id: str, *, terminate: bool = False) -> Job:
        """Cancel a waiting job at once; ask a running one to stop (at its next progress(),
        or CANCELLED if it then fails or its worker is lost), or with ``terminate`` mark it
        CANCELLED now: the worker's pool process that runs it ends within a second, while
        it still runs that job (never a bundle's next job)."""
        job = self.get(job_id)
        if job.status in FINAL:
            raise JobStateError(f"job {job_id} is already {job.status.value}")
        now = time.time()
        with writing(self.engine) as conn:
            row = conn.execute(store.cancel_waiting(job_id, now)).first()
            if row is None:
                row = conn.execute(
                    store.request_cancel_running(job_id, now=now, terminate=terminate)
                ).first()
            if row is None and terminate:  # its transaction committed: a request at most
                row = conn.execute(
                    store.request_cancel_running(job_id, now=now, terminate=False)
                ).first()
            hooks.after_change(conn, row)
        return self.get(job_id)

    def retry(self, job_id: str) -> Job:
        """Re-run a DEAD (or CANCELLED) job with a fresh set of attempts."""
        job = self.get(job_id)
        spec = get_spec(job.task)
        with writing(self.engine) as conn:
            updated = conn.execute(store.retry_dead(job_id, spec.retry.max_attempts)).rowcount
        if updated != 1:
            raise JobStateError(
                f"only DEAD or CANCELLED jobs can be retried; {job_id} is {job.status.value}"
            )
        values = {"job_id": job_id, "queue": job.queue, "priority": job.priority}
        self._dispatch(spec, values, 0)
        return self.get(job_id)

    def wait(self, job_id: str, timeout_s: float = 60.0) -> Job:
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            job = self.get(job_id)
            if job.done:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} is still {job.status.value} after {timeout_s}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def await_job(self, job_id: str, timeout_s: float = 60.0) -> Job:
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            job = await self.aget(job_id)
            if job.done:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} is still {job.status.value} after {timeout_s}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return status_counts(conn.execute(count_by_status()))

    def close(self, *, wait: bool = False) -> None:
        # What submit() returned goes to the broker (or the fallback) before the publisher
        # closes; past the timeout it waits in SQL for the reaper.
        if not self._relay.close(timeout_s=2 * self.settings.publish_timeout_s + 1):
            log.warning("jobs submitted last are left for the reaper to publish")
        self.local.shutdown(wait=wait)
        self.publisher.close()
        dispose_all(self.engine)

    async def aclose(self) -> None:
        self.close()
        if self._async_engine is not None:
            await self._async_engine.dispose()


_live: weakref.WeakSet[JobManager] = weakref.WeakSet()


def _after_fork() -> None:
    for jm in list(_live):
        jm._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork)


def _status_filter(status: str | None) -> str | None:
    if status is None:
        return None
    try:
        return JobStatus(status.upper()).value
    except ValueError:
        raise JobError(
            f"unknown status {status!r}; one of {[s.value for s in JobStatus]}"
        ) from None


def _page_size(page_size: int) -> int:
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise JobError(f"page_size must be 1..{MAX_PAGE_SIZE}")
    return page_size
