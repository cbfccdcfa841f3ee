"""Running a bundle: several jobs that came in one broker message (tasklab.jobs.publisher).

The jobs run one after the other, each claimed, leased and recorded on its own. So that a
long job does not hold the ones behind it while other workers are idle, a watcher thread hands
the jobs not started yet back to the broker, as a new bundle, once the bundle has run for its
budget; the worker then stops after the job it is running. If the broker does not take them,
they stay and run here. Nor are they handed back while their queue has messages waiting: then
every worker of the queue has work, and handing back would only send jobs that have waited
their turn to the back of the line again, pass after pass under a backlog.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from tasklab.errors import BrokerUnavailable
from tasklab.observe import metrics

log = logging.getLogger("tasklab.jobs.bundle")
HandBack = Callable[[str, list[str], str, int], object]  # (task, job ids, queue, priority)
QueueBusy = Callable[[str], bool]  # (queue) -> it has messages waiting


class Bundle:
    """The jobs of one bundle message, taken one at a time by the worker running it."""

    def __init__(self, task: str, job_ids: list[str], queue: str, priority: int) -> None:
        self.task = task
        self.job_ids = job_ids
        self.queue = queue
        self.priority = priority
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> str | None:
        """The next job to run, or None when none is left here."""
        with self._lock:
            if self._next >= len(self.job_ids):
                return None
            self._next += 1
            return self.job_ids[self._next - 1]

    @property
    def left(self) -> int:
        """How many jobs are not taken yet."""
        with self._lock:
            return len(self.job_ids) - self._next

    def hand_back(self, publish: HandBack) -> int:
        """Publish the jobs not taken yet as a new bundle; they are no longer taken here.
        Returns how many went back (0 if none was left or the broker refused them)."""
        with self._lock:  # take() waits: a job is either run here or handed back
            rest = self.job_ids[self._next :]
            if not rest:
                return 0
            try:
                publish(self.task, rest, self.queue, self.priority)
            except BrokerUnavailable as e:
                log.info("bundle: %d job(s) stay with this worker: %s", len(rest), e)
                return 0
            self._next = len(self.job_ids)
        metrics.BUNDLE_HANDED_BACK.labels(self.task, self.queue).inc(len(rest))
        return len(rest)


class BundleWatch:
    """One thread per process: hands back the rest of each bundle that outran its budget."""

    def __init__(
        self, publish: HandBack, budget_s: float, queue_busy: QueueBusy | None = None
    ) -> None:
        self.publish = publish
        self.budget_s = budget_s
        self.queue_busy = queue_busy
        self._due: dict[Bundle, float] = {}
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()
        self._pid = 0

    def watch(self, bundle: Bundle) -> None:
        if self._pid != os.getpid():  # first use, or a forked child
            with self._start_lock:
                if self._pid != os.getpid():
                    self._cond = threading.Condition()
                    self._due = {}
                    threading.Thread(target=self._run, name="tasklab-bundles", daemon=True).start()
                    self._pid = os.getpid()
        with self._cond:
            self._due[bundle] = time.monotonic() + self.budget_s
            self._cond.notify()

    def done(self, bundle: Bundle) -> None:
        with self._cond:
            self._due.pop(bundle, None)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                now = time.monotonic()
                late = [b for b, due in self._due.items() if due <= now]
                for b in late:
                    del self._due[b]
                if not late:
                    cond.wait(min(self._due.values(), default=now + 60) - now)
                    continue
            for bundle in late:
                if bundle.left and self._busy(bundle.queue):
                    with cond:  # look again after another budget: the backlog may be gone
                        self._due[bundle] = time.monotonic() + self.budget_s
                    continue
                bundle.hand_back(self.publish)

    def _busy(self, queue: str) -> bool:
        if self.queue_busy is None:
            return False
        try:
            return self.queue_busy(queue)
        except Exception as e:  # cannot tell: hand back (a refused publish keeps them here)
            log.debug("bundle: cannot read the depth of %s: %s", queue, e)
            return False
