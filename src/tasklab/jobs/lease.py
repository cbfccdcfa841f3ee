"""Lease heartbeat: while a job runs, its lease is renewed so the reaper leaves it alone.

One daemon thread per process (restarted after fork), renewing every lease_s / 3.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy import Engine

from tasklab.database import writing
from tasklab.jobs import store

log = logging.getLogger("tasklab.jobs.lease")


class LeaseKeeper:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._held: dict[str, tuple[int, float]] = {}  # job id -> (attempt, lease_s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, job_id: str, attempt: int, lease_s: float) -> None:
        with self._lock:
            self._held[job_id] = (attempt, lease_s)
        self._ensure_thread()

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def held(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return dict(self._held)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="tasklab-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            held = self.held()
            interval = min((lease for _, lease in held.values()), default=30.0) / 3
            self._wake.wait(interval)
            self.renew_now()

    def renew_now(self) -> int:
        """Renew every held lease; returns how many were still ours."""
        held = self.held()
        if not held:
            return 0
        now = time.time()
        renewed = 0
        try:
            with writing(self.engine) as conn:
                store.relax_commit(conn)
                for job_id, (attempt, lease_s) in held.items():
                    renewed += conn.execute(
                        *store.renew_lease(job_id, attempt, now + lease_s)
                    ).rowcount
        except Exception:  # a DB hiccup must not kill the heartbeat; the next tick retries
            log.exception("lease renewal failed")
        return renewed
