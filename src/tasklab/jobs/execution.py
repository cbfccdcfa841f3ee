"""Running one delivery of a job: claim, run under a lease, record the outcome (fenced).

The same path runs in Celery workers and in the local fallback executor.
"""

from __future__ import annotations

import contextvars
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from tasklab.database import relaxed_writes, write_gate, writing
from tasklab.errors import JobError, StaleAttempt
from tasklab.jobs import hooks, store
from tasklab.jobs.bundle import Bundle, BundleWatch, HandBack, QueueBusy
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.records import JobStatus
from tasklab.jobs.registry import JobSpec
from tasklab.jobs.sqlite_writes import HotWrites
from tasklab.observe import metrics

log = logging.getLogger("tasklab.jobs")
PROGRESS_MIN_INTERVAL_S = 0.5
_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "tasklab_job", default=None
)


class JobCancelled(JobError):
    """Raised inside a job (by ``progress()``) when someone asked to cancel it."""


def current_job() -> JobContext:
    ctx = _current.get()
    if ctx is None:
        raise JobError("current_job() called outside a running tasklab job")
    return ctx


@dataclass
class JobContext:
    """What a running job sees of itself: id, attempt, progress and the fenced transaction."""

    id: str
    task: str
    queue: str
    attempt: int
    max_attempts: int
    engine: Engine
    lease_s: float
    priority: int = 5
    leases: LeaseKeeper | None = field(default=None, repr=False)
    started_at: float | None = None
    _last_progress_at: float = field(default=0.0, repr=False)
    _session: Session | None = field(default=None, repr=False)
    _committed: bool = field(default=False, repr=False)
    _used_transaction: bool = field(default=False, repr=False)

    def progress(self, current: int, total: int | None = None, message: str | None = None) -> None:
        """Record progress (at most every 0.5 s, and always at the end); raise JobCancelled
        if a cancel was requested. Also renews the lease. Inside ``transaction()`` it is
        part of that transaction; after the transaction committed (the job is done) it
        records nothing."""
        if self._committed:
            return
        if self.leases is not None and self.leases.lost(self.id, self.attempt):
            raise StaleAttempt(f"job {self.id} attempt {self.attempt} lost its lease")
        now = time.time()
        last = total is not None and current >= total
        if not last and now - self._last_progress_at < PROGRESS_MIN_INTERVAL_S:
            return
        self._last_progress_at = now
        prepared = store.progress(
            self.id,
            self.attempt,
            current=current,
            total=total,
            message=message,
            lease_s=self.lease_s,
        )
        if self._session is not None:  # a second connection would wait for this one's lock
            row = self._session.connection().execute(*prepared).first()
        else:
            with writing(self.engine) as conn:
                row = conn.execute(*prepared).first()
        if row is None:
            raise StaleAttempt(f"job {self.id} attempt {self.attempt} is no longer current")
        if row[0]:
            raise JobCancelled(f"job {self.id} was cancelled")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose effects commit together with the job's completion, fenced by the
        attempt number: if another attempt took over (or the job already finished), nothing
        commits, so the effects happen exactly once (the attempt ends as stale).

        The commit happens when the block ends, with a fenced mark on the job: from then on
        the job is done (its effects are in) and is never run again. It is SUCCEEDED with
        what the function returns; an exception raised after the block is logged, not
        retried; a worker lost before that leaves it SUCCEEDED without a result. On SQLite
        the block
        holds the database's one write lock from its first statement to its commit: keep
        slow work (network calls, computation) outside it.
        """
        if self._used_transaction:
            raise JobError("job.transaction() may be used once per attempt")
        self._used_transaction = True
        gate = _Held(write_gate(self.engine))
        session = Session(self.engine)
        # The write gate is taken when the session starts its transaction (its first
        # statement) and let go as soon as the database committed: before the session's
        # other after-commit hooks (a cache invalidation does network I/O).
        event.listen(session, "after_begin", lambda *_a: gate.take())
        event.listen(session, "after_commit", lambda _s: gate.release())
        session.begin()
        self._session = session
        try:
            # The fenced mark comes first: the job's row is locked before any of the
            # application's rows, in the order a cancel or the reaper locks them (job row,
            # then a give-up hook's rows), so that they cannot deadlock on PostgreSQL; and a
            # stale attempt stops here, before its effects.
            done = session.execute(store.mark_committed(self.id, self.attempt, time.time()))
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise StaleAttempt(
                    f"job {self.id} attempt {self.attempt} lost its claim; effects rolled back"
                )
            yield session
            if self.leases is not None and self.leases.lost(self.id, self.attempt):
                raise StaleAttempt(f"job {self.id} attempt {self.attempt} lost its lease")
        except BaseException:
            self._session = None
            _end(session, gate, commit=False)
            raise
        self._session = None
        _end(session, gate, commit=True)
        self._committed = True


class _Held:
    """A write gate taken once and released once, whichever way the transaction ends."""

    def __init__(self, gate: AbstractContextManager[None]) -> None:
        self._gate = gate
        self._held = False

    def take(self) -> None:
        if not self._held:
            self._gate.__enter__()
            self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.__exit__(None, None, None)


def _end(session: Session, gate: _Held, *, commit: bool) -> None:
    """Commit or roll back a job's transaction, then let the next writer in."""
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()
        gate.release()


@dataclass
class Outcome:
    status: str  # skipped | succeeded | retrying | dead | cancelled | stale
    retry_in_s: float | None = None
    completion: store.Prepared | None = None  # a success not written yet (run_bundle)


def _check_completion(updated: object, completion: store.Prepared) -> None:
    if updated != 1:
        params = completion[1]
        log.warning(
            "job %s attempt %s finished after losing its claim; result dropped",
            params["p_id"],
            params["p_attempt"],
        )


class Executor:
    """Claims and runs deliveries; ``reschedule`` publishes the next attempt of a retry."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_owner: str,
        via: str,
        default_lease_s: float,
        leases: LeaseKeeper,
        reschedule: Callable[[JobSpec, str, str, int, float], None],
        hand_back: HandBack | None = None,
        bundle_budget_s: float = 0.5,
        queue_busy: QueueBusy | None = None,
    ) -> None:
        self.engine = engine
        self.relaxed = relaxed_writes(engine)  # claims, completions (see _write)
        self._hot = HotWrites(engine) if engine.dialect.name == "sqlite" else None
        self.lease_owner = lease_owner
        self.via = via
        self.default_lease_s = default_lease_s
        self.leases = leases
        self.reschedule = reschedule
        self._watch = (
            None if hand_back is None else BundleWatch(hand_back, bundle_budget_s, queue_busy)
        )

    def run_bundle(
        self,
        spec: JobSpec,
        job_ids: list[str],
        *,
        queue: str,
        priority: int,
        message_id: str | None = None,
    ) -> list[Outcome]:
        """Run a bundle's jobs one after the other, each as ``run`` would; past
        ``bundle_budget_s`` the ones not started go back to the broker (tasklab.jobs.bundle).

        A job that succeeded without ``job.transaction()`` has its completion written with
        the next job's claim (on SQLite in one write transaction instead of two). If the
        worker dies in
        between (no job runs there), that job runs again: its execution is at least once,
        as always; effects committed through ``job.transaction()`` commit at once.
        """
        bundle = Bundle(spec.name, job_ids, queue, priority)
        if self._watch is not None and len(job_ids) > 1:
            self._watch.watch(bundle)
        outcomes: list[Outcome] = []
        carry: store.Prepared | None = None
        try:
            while (job_id := bundle.take()) is not None:
                claimed = self._claim(spec, job_id, carry, message_id=message_id)
                carry = None
                if claimed is None:
                    outcomes.append(Outcome("skipped"))
                    continue
                outcomes.append(self._execute(spec, *claimed, defer=True))
                carry = outcomes[-1].completion
        finally:
            if self._watch is not None:
                self._watch.done(bundle)
            if carry is not None:
                _check_completion(self._write(carry)[0], carry)
        return outcomes

    def run(self, spec: JobSpec, job_id: str, *, message_id: str | None = None) -> Outcome:
        claimed = self._claim(spec, job_id, message_id=message_id)
        return Outcome("skipped") if claimed is None else self._execute(spec, *claimed)

    def _write(self, *prepared: store.Prepared) -> list[Any]:
        """Claims and completions; per statement, its rows (RETURNING, as mappings) or its
        rowcount. On SQLite in one write transaction on the DBAPI connection
        (tasklab.jobs.sqlite_writes); on PostgreSQL each in autocommit, without waiting for
        the WAL flush (``database.relaxed_writes``): one round trip each, and a claim or a
        completion lost in a database crash only makes the job run again."""
        if self._hot is not None:
            return self._hot.run(*prepared)
        out: list[Any] = []
        with self.relaxed.connect() as conn:
            for statement, params in prepared:
                result = conn.execute(statement, params)
                out.append(
                    [dict(r._mapping) for r in result] if result.returns_rows else result.rowcount
                )
        return out

    def _claim(
        self,
        spec: JobSpec,
        job_id: str,
        carry: store.Prepared | None = None,
        *,
        message_id: str | None = None,
    ) -> tuple[JobContext, list[Any], dict[str, Any]] | None:
        """Claim one attempt (and record ``carry``, a finished job's completion, in the same
        transaction); None if the job is not ours to run (finished, leased, cancelled)."""
        lease_s = spec.lease_s or self.default_lease_s
        claim = store.claim(
            job_id,
            lease_owner=self.lease_owner,
            lease_s=lease_s,
            via=self.via,
            now=time.time(),
            message_id=message_id,
        )
        if carry is None:
            rows = self._write(claim)[0]
        else:
            done, rows = self._write(carry, claim)
            _check_completion(done, carry)
        assert isinstance(rows, list)
        if not rows:
            metrics.DUPLICATE_DELIVERIES.labels(spec.name).inc()
            return None
        m = rows[0]
        ctx = JobContext(
            id=job_id,
            task=spec.name,
            queue=m["queue"],
            attempt=m["attempt"],
            max_attempts=m["max_attempts"],
            engine=self.engine,
            lease_s=lease_s,
            priority=m["priority"],
            leases=self.leases,
            started_at=m["started_at"],
        )
        wait_from = m["next_attempt_at"] or m["queued_at"] or m["created_at"]
        metrics.JOB_QUEUE_WAIT.labels(spec.name, ctx.queue).observe(
            max(0.0, m["started_at"] - wait_from)
        )
        return ctx, list(m["args"]), dict(m["kwargs"])

    def _execute(
        self,
        spec: JobSpec,
        ctx: JobContext,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        defer: bool = False,
    ) -> Outcome:
        token = _current.set(ctx)
        self.leases.hold(ctx.id, ctx.attempt, ctx.lease_s)
        started = time.perf_counter()
        try:
            result = spec.func(ctx, *args, **kwargs) if spec.bind else spec.func(*args, **kwargs)
        except Exception as e:
            return self._raised(spec, ctx, e)
        finally:
            metrics.JOB_DURATION.labels(spec.name, ctx.queue).observe(time.perf_counter() - started)
            self.leases.release(ctx.id)
            _current.reset(token)
        # (a BaseException - time limit, worker shutdown - leaves the job to its lease)
        return self._succeed(spec, ctx, result, defer=defer)

    def _raised(self, spec: JobSpec, ctx: JobContext, exc: Exception) -> Outcome:
        if ctx._committed:  # the transaction is in: the job is done
            log.error(
                "job %s raised after its transaction committed; it is SUCCEEDED: %s: %s",
                ctx.id,
                type(exc).__name__,
                exc,
            )
            return self._succeed(spec, ctx, None, defer=False)
        if isinstance(exc, JobCancelled):
            return self._finish_cancelled(spec, ctx)
        if isinstance(exc, StaleAttempt):
            log.warning("job %s: %s", ctx.id, exc)
            return Outcome("stale")
        return self._fail(spec, ctx, exc)

    def _succeed(self, spec: JobSpec, ctx: JobContext, result: Any, *, defer: bool) -> Outcome:
        """Record the completion; with ``defer`` hand it back in the outcome, for the caller
        to write with its next claim."""
        value = _jsonable(result)
        if self.leases.lost(ctx.id, ctx.attempt) and not ctx._committed:
            log.warning("job %s attempt %s lost its lease; result dropped", ctx.id, ctx.attempt)
            return Outcome("stale")
        write = store.complete(ctx.id, ctx.attempt, result=value, now=time.time())
        metrics.JOBS_FINISHED.labels(spec.name, ctx.queue, "succeeded").inc()
        if defer:
            return Outcome("succeeded", completion=write)
        updated = self._write(write)[0]
        if updated != 1:
            log.warning(
                "job %s attempt %s finished after losing its claim; result dropped",
                ctx.id,
                ctx.attempt,
            )
            return Outcome("stale")
        return Outcome("succeeded")

    def _fail(self, spec: JobSpec, ctx: JobContext, exc: Exception) -> Outcome:
        retry = spec.retry.should_retry(exc, ctx.attempt, ctx.max_attempts)
        delay = spec.retry.delay_s(ctx.attempt) if retry else None
        now = time.time()
        error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        # The attempt's history row and a give-up hook's writes go in this transaction.
        with writing(self.engine) as conn:
            row = conn.execute(
                store.fail(
                    ctx.id,
                    ctx.attempt,
                    error=error,
                    tb=tb,
                    retry_at=None if delay is None else now + delay,
                    now=now,
                )
            ).first()
            if row is not None:
                conn.execute(
                    store.record_attempt(
                        ctx.id,
                        ctx.attempt,
                        outcome="failed",
                        ran_on=self.lease_owner,
                        started_at=ctx.started_at,
                        now=now,
                        error=error,
                        tb=tb,
                    )
                )
            hooks.after_change(conn, row)
        if row is None:
            return Outcome("stale")
        ended = row.status
        if ended == JobStatus.CANCELLED.value:  # a cancel was asked for while it ran
            metrics.JOBS_FINISHED.labels(spec.name, ctx.queue, "cancelled").inc()
            return Outcome("cancelled")
        if delay is None:
            log.error(
                "job %s (%s) is DEAD after %d attempt(s): %s", ctx.id, spec.name, ctx.attempt, error
            )
            metrics.JOB_DEAD_LETTERS.labels(spec.name, ctx.queue).inc()
            metrics.JOBS_FINISHED.labels(spec.name, ctx.queue, "dead").inc()
            return Outcome("dead")
        log.warning(
            "job %s (%s) attempt %d failed, retry in %.1f s: %s",
            ctx.id,
            spec.name,
            ctx.attempt,
            delay,
            error,
        )
        metrics.JOB_RETRIES.labels(spec.name, ctx.queue).inc()
        self.reschedule(spec, ctx.id, ctx.queue, ctx.priority, delay)
        return Outcome("retrying", retry_in_s=delay)

    def _finish_cancelled(self, spec: JobSpec, ctx: JobContext) -> Outcome:
        with writing(self.engine) as conn:
            row = conn.execute(store.mark_cancelled_running(ctx.id, ctx.attempt, time.time()))
            hooks.after_change(conn, row.first())
        metrics.JOBS_FINISHED.labels(spec.name, ctx.queue, "cancelled").inc()
        return Outcome("cancelled")


def _jsonable(value: Any) -> Any:
    """Results are stored as JSON; anything orjson cannot encode is stored as its repr."""
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError:
        return repr(value)
