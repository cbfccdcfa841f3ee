"""Lease heartbeat: while a job runs, its lease is renewed so the reaper leaves it alone.

One daemon thread per process (restarted after fork) renews every held lease once a third of
the shortest lease has passed, and wakes as soon as a job with a shorter lease starts. Leases
are set by the database's clock (``store.db_now``), so hosts whose clocks drift agree on them.

A renewal that finds the row no longer ours (the reaper took it back after a stall, or a cancel
with terminate marked it) makes the attempt a zombie: it is logged, ``progress()`` raises
``StaleAttempt`` and nothing it records is kept (every write of an attempt is fenced). In a
worker's pool process (``terminate_self``) a job cancelled with terminate while it still runs
here ends with its process, as Celery's ``revoke(terminate=True)`` would, but only while that
very job runs: a bundle's next job is never the one killed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from sqlalchemy import Engine

from tasklab.database import relaxed_writes, writing
from tasklab.jobs import store

log = logging.getLogger("tasklab.jobs.lease")
IDLE_WAIT_S = 30.0
TERMINATE_POLL_S = 1.0  # how soon a cancel with terminate reaches the job's process


class LeaseKeeper:
    def __init__(self, engine: Engine, *, terminate_self: bool = False) -> None:
        self.engine = engine
        self.terminate_self = terminate_self
        self._held: dict[str, tuple[int, float]] = {}  # job id -> (attempt, lease_s)
        self._lost: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._renewed_at = 0.0
        self._sleep_until = 0.0  # when the loop wakes next by itself (monotonic)

    def hold(self, job_id: str, attempt: int, lease_s: float) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's jobs are not ours
                self._held.clear()
                self._lost.clear()
            now = time.monotonic()
            if not self._held:  # the claim just set this lease: the first renewal is due later
                self._renewed_at = now
            self._held[job_id] = (attempt, lease_s)
            due = self._renewed_at + lease_s / 3
            if self.terminate_self:
                due = min(due, now + TERMINATE_POLL_S)
            # Wake the loop only if it sleeps past this lease's first duty (it may be idle,
            # or waiting for a longer lease); a wake per job would cost a thread switch each.
            wake = due < self._sleep_until
        self._ensure_thread()
        if wake:
            self._wake.set()

    def release(self, job_id: str) -> None:
        with self._lock:
            held = self._held.pop(job_id, None)
            if held is not None:
                self._lost.discard((job_id, held[0]))

    def held(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return dict(self._held)

    def lost(self, job_id: str, attempt: int) -> bool:
        """True once a renewal found this attempt's row taken back (a zombie attempt)."""
        with self._lock:
            return (job_id, attempt) in self._lost

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="tasklab-lease", daemon=True)
        self._thread.start()

    def _next_wait(self) -> float:
        with self._lock:  # hold() reads _sleep_until under it: no wake can fall in between
            now = time.monotonic()
            if not self._held:
                wait = IDLE_WAIT_S
            else:
                due = self._renewed_at + min(lease for _, lease in self._held.values()) / 3
                wait = max(0.0, due - now)
                if self.terminate_self:
                    wait = min(wait, TERMINATE_POLL_S)
            self._sleep_until = now + wait
            return wait

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._next_wait())
            self._wake.clear()
            held = self.held()
            if not held:
                continue
            shortest = min(lease for _, lease in held.values())
            if time.monotonic() - self._renewed_at >= shortest / 3 - 0.05:
                self.renew_now()
            elif self.terminate_self:
                self._check_terminated(list(held))

    def renew_now(self) -> int:
        """Renew every held lease; returns how many were still ours."""
        held = self.held()
        self._renewed_at = time.monotonic()
        if not held:
            return 0
        renewed = 0
        gone: list[tuple[str, int]] = []
        try:
            with writing(relaxed_writes(self.engine)) as conn:  # a renewal lost in a crash:
                for job_id, (attempt, lease_s) in held.items():  # the lease runs out, no more
                    n = conn.execute(*store.renew_lease(job_id, attempt, lease_s)).rowcount
                    renewed += n
                    if n == 0:
                        gone.append((job_id, attempt))
        except Exception:  # a DB hiccup must not kill the heartbeat; the next tick retries
            log.exception("lease renewal failed")
            return renewed
        if gone:
            self._mark_lost(gone)
        return renewed

    def _mark_lost(self, gone: list[tuple[str, int]]) -> None:
        with self._lock:  # only attempts still running here (not released meanwhile)
            fresh = [
                (job_id, attempt)
                for job_id, attempt in gone
                if (job_id, attempt) not in self._lost
                and (held := self._held.get(job_id)) is not None
                and held[0] == attempt
            ]
            self._lost.update(fresh)
        for job_id, attempt in fresh:
            log.warning(
                "job %s attempt %d lost its lease (taken back, finished or cancelled "
                "elsewhere): this attempt records nothing more",
                job_id,
                attempt,
            )
        if self.terminate_self and fresh:
            self._check_terminated([job_id for job_id, _ in fresh])

    def _check_terminated(self, job_ids: list[str]) -> None:
        """End this process if it still runs a job that was cancelled with terminate."""
        try:
            with self.engine.connect() as conn:
                cancelled = set(conn.execute(store.cancelled_among(job_ids)).scalars())
        except Exception:
            log.exception("lease: could not read whether running jobs were cancelled")
            return
        if not cancelled:
            return
        with self._lock:  # release() waits: the job cannot end between this check and the kill
            running = cancelled & set(self._held)
            if running:
                log.warning("job(s) %s cancelled with terminate: ending this process", running)
                os.kill(os.getpid(), signal.SIGKILL)
