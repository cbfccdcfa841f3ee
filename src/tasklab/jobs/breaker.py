"""A circuit breaker for publishing: fail fast while the broker is down, probe to come back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum

from tasklab.observe import metrics

log = logging.getLogger("tasklab.jobs.breaker")


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """CLOSED: calls go through. One failure opens it: calls are refused at no cost for
    ``reset_s``. Then it probes (HALF_OPEN); success closes it.

    With a ``probe`` (a cheap call that raises if the broker does not answer), the probe runs
    in a thread of its own and every caller is refused meanwhile: no request waits for a
    probe of a broker that may not answer for ``publish_timeout_s``. Without one, the next
    caller's own call is the probe.
    """

    def __init__(
        self,
        reset_s: float,
        *,
        name: str = "broker",
        probe: Callable[[], object] | None = None,
    ) -> None:
        self.reset_s = reset_s
        self.name = name
        self.probe = probe
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
            if self.state is not State.HALF_OPEN or self._probing:
                return False
            self._probing = True
            if self.probe is None:
                return True  # this caller's call is the probe
        threading.Thread(target=self._run_probe, name="tasklab-breaker-probe", daemon=True).start()
        return False

    def _run_probe(self) -> None:
        assert self.probe is not None
        try:
            self.probe()
        except BaseException as e:  # any failure keeps the circuit open
            self.record_failure(type(e).__name__)
            if not isinstance(e, Exception):
                raise
        else:
            self.record_success()

    def release_probe(self) -> None:
        """The probing call ended without a verdict (interrupted): let another probe."""
        with self._lock:
            self._probing = False

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
