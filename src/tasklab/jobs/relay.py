"""Publishing behind ``submit()``: the transactional-outbox relay of one process.

``submit()`` returns once the job is committed to SQL; this relay's thread then hands it to
the broker (or to the local fallback), together with every job submitted meanwhile (and,
while jobs keep coming fast, for up to ``relay_linger_ms``): one broker round trip, and bundles of
jobs in one message, however the callers submit. If the
process dies before the relay publishes a job, the job is QUEUED in SQL without a message and
the reaper publishes it (tasklab.jobs.recovery).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger("tasklab.jobs.relay")
T = TypeVar("T")
STREAM_GAP_S = 0.05


class Relay(Generic[T]):
    def __init__(
        self,
        dispatch: Callable[[list[T]], Sequence[object]],
        *,
        linger_s: float = 0.0,
        max_batch: int = 256,
        exit_flush_s: float = 5.0,
        settle: Callable[[], None] | None = None,
        settle_every_s: float = 0.1,
    ) -> None:
        """``dispatch(items)`` publishes a batch and returns one outcome per item: anything,
        or the exception that item met (logged; the job waits in SQL for the reaper).

        ``linger_s``: when jobs come in a dense stream (the last batch went out less than
        STREAM_GAP_S ago, and the last two puts were less than ``linger_s / 2`` apart: more
        are due within the linger), wait up to this long for more before publishing, so
        that they travel in bundles; a job submitted alone, or in a sparse stream, goes at
        once.

        ``settle()``: the follow-up work of the dispatches (the manager's QUEUED marks), done
        ``settle_every_s`` after the first dispatch it covers (sooner when ``flush`` or
        ``close`` waits): one write per interval instead of one per batch, which would
        compete with the submits for the database. ``flush`` returns only after it ran."""
        self._dispatch = dispatch
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._exit_flush_s = exit_flush_s
        self._settle = settle
        self._settle_every_s = settle_every_s
        self._pid_lock = threading.Lock()
        self._reset()
        self._pid = os.getpid()
        _live.add(self)

    def _reset(self) -> None:
        self._last_dispatch_at = -1e9
        self._unsettled = False  # dispatched since the last settle
        self._unsettled_since = 0.0
        self._flushers = 0
        self._last_put_at = -1e9
        self._put_gap = 1e9
        self._cond = threading.Condition()
        self._pending: list[T] = []
        self._in_flight = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def put(self, item: T) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's items and thread are
            with self._pid_lock:  # the parent's (a closed relay stays closed)
                if self._pid != os.getpid():
                    closed = self._closed
                    self._reset()
                    self._closed = closed
                    self._pid = os.getpid()
        with self._cond:
            if self._closed:
                raise RuntimeError("the relay is closed")
            self._pending.append(item)
            now = time.monotonic()
            self._put_gap, self._last_put_at = now - self._last_put_at, now
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tasklab-relay", daemon=True)
                self._thread.start()
            # Wake the thread only when it waits for a first item or the batch is full: a
            # wake-up per submit would take the GIL from the submitting thread each time.
            if len(self._pending) == 1 or len(self._pending) >= self._max_batch:
                self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything put so far was dispatched and settled; False on timeout."""
        with self._cond:
            self._flushers += 1
            self._cond.notify_all()  # a settle waiting for its interval runs now
            try:
                return self._cond.wait_for(
                    lambda: not self._pending and not self._in_flight and not self._unsettled,
                    timeout_s,
                )
            finally:
                self._flushers -= 1

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush, then stop the thread; later ``put`` calls raise."""
        done = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return done

    def _run(self) -> None:
        while True:
            batch: list[T] = []
            with self._cond:
                while not self._pending and not self._settle_now():
                    if self._closed:
                        return
                    self._cond.wait(self._settle_in() if self._unsettled else None)
                if self._pending:
                    streaming = time.monotonic() - self._last_dispatch_at < STREAM_GAP_S
                    if streaming and self._put_gap < self._linger_s / 2:
                        self._linger()
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                self._in_flight = max(1, len(batch))
            if batch:
                self._dispatch_batch(batch)
            if self._unsettled and (self._settle_in() <= 0 or self._idle_and_awaited()):
                self._run_settle()
            with self._cond:
                self._in_flight = 0
                if batch:
                    self._last_dispatch_at = time.monotonic()
                self._cond.notify_all()

    def _dispatch_batch(self, batch: list[T]) -> None:
        try:
            outcomes = self._dispatch(batch)
        except Exception:  # the jobs are in SQL: the reaper publishes them
            log.exception("relay: %d job(s) left for the reaper", len(batch))
        else:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    log.error("relay: a job is left for the reaper: %s", outcome)
        if self._settle is not None and not self._unsettled:
            self._unsettled, self._unsettled_since = True, time.monotonic()

    def _settle_in(self) -> float:
        return self._unsettled_since + self._settle_every_s - time.monotonic()

    def _idle_and_awaited(self) -> bool:
        with self._cond:
            return not self._pending and (self._flushers > 0 or self._closed)

    def _settle_now(self) -> bool:
        """(Holding the condition.) Settle with nothing to dispatch: its interval is up, or
        someone waits for it (flush, close)."""
        return self._unsettled and (self._settle_in() <= 0 or self._flushers > 0 or self._closed)

    def _run_settle(self) -> None:
        assert self._settle is not None
        self._unsettled = False
        try:
            self._settle()
        except Exception:  # what it records is only a hint (the reaper's): never fatal
            log.exception("relay: settling the dispatched batches failed")

    def _linger(self) -> None:
        """Inside a stream of submits, gather for up to ``linger_s`` (called holding the
        condition; waiting releases it)."""
        end = time.monotonic() + self._linger_s
        while len(self._pending) < self._max_batch and not self._closed:
            left = end - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)


_live: weakref.WeakSet[Relay[Any]] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """What submit() returned goes out before the interpreter stops (bounded per relay)."""
    for relay in list(_live):
        if relay._pid == os.getpid():
            relay.flush(relay._exit_flush_s)
