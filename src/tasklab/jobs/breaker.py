"""A circuit breaker for publishing: fail fast while the broker is down, probe to come back."""

from __future__ import annotations

import logging
import threading
import time
from enum import Enum

from tasklab.observe import metrics

log = logging.getLogger("tasklab.jobs.breaker")


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """CLOSED: calls go through. One failure opens it: calls are refused at no cost for
    ``reset_s``. Then one caller at a time probes (HALF_OPEN); success closes it."""

    def __init__(self, reset_s: float, *, name: str = "broker") -> None:
        self.reset_s = reset_s
        self.name = name
        self.state = State.CLOSED
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self.state is State.CLOSED:
                return True
            if self.state is State.OPEN and time.monotonic() - self._opened_at >= self.reset_s:
                self.state = State.HALF_OPEN
            if self.state is State.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._probing = False
            if self.state is not State.CLOSED:
                log.warning("%s answers again: circuit closed, publishing resumes", self.name)
                self.state = State.CLOSED
                metrics.FALLBACK_ACTIVE.set(0)

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self._probing = False
            self._opened_at = time.monotonic()
            if self.state is not State.OPEN:
                log.warning(
                    "%s unavailable (%s): circuit open for %.1f s, jobs fall back",
                    self.name,
                    reason,
                    self.reset_s,
                )
                self.state = State.OPEN
                metrics.FALLBACK_ACTIVE.set(1)

    @property
    def is_open(self) -> bool:
        return self.state is not State.CLOSED
