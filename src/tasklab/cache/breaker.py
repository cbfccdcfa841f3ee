"""A circuit breaker: after a few consecutive failures, stop calling Redis for a while.

Closed: calls go through. ``failure_threshold`` consecutive failures open it: for ``reset_s``
every call is refused at the cost of a clock read, so a dead Redis costs microseconds per call
instead of a connect timeout. Then one caller is let through as a probe (half-open): success
closes the circuit, failure opens it for another ``reset_s``.

Hooks run outside the lock, in the thread whose call caused the transition: ``on_open`` when a
closed circuit opens, ``on_recover(was_open)`` on the first success after any failure.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_open: Callable[[], None] | None = None,
        on_recover: Callable[[bool], None] | None = None,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.reset_s = reset_s
        self.clock = clock
        self.on_open = on_open
        self.on_recover = on_recover
        self.state = BreakerState.CLOSED
        self.opened_at = 0.0
        self._failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """False while open and not yet due for a probe."""
        return self.state is not BreakerState.OPEN or self.clock() >= self._retry_at

    def allow(self) -> bool:
        """May the caller try Redis now? Lets one probe through once ``reset_s`` has passed."""
        if self._closed():
            return True
        with self._lock:
            if self._closed():
                return True
            now = self.clock()
            if now < self._retry_at:
                return False
            # Open and due, or a probe that never reported back: let one caller through.
            self.state = BreakerState.HALF_OPEN
            self._retry_at = now + self.reset_s
            return True

    def _closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def record_success(self) -> None:
        if self._failures == 0 and self.state is BreakerState.CLOSED:
            return
        with self._lock:
            was_open = self.state is not BreakerState.CLOSED
            had_failures = self._failures > 0 or was_open
            self.state = BreakerState.CLOSED
            self._failures = 0
        if had_failures and self.on_recover is not None:
            self.on_recover(was_open)

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            was_closed = self.state is BreakerState.CLOSED
            if not was_closed or self._failures >= self.failure_threshold:
                now = self.clock()
                if was_closed:
                    self.opened_at = now
                self.state = BreakerState.OPEN
                self._retry_at = now + self.reset_s
            opened = was_closed and self.state is BreakerState.OPEN
        if opened and self.on_open is not None:
            self.on_open()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()


__all__ = ["BreakerState", "CircuitBreaker"]
