"""The drills' fault tools: SIGKILL worker nodes, take the broker away and bring it back
(``BrokerCut``: the lab's own Redis stopped and restarted empty, or the link to any broker cut
by the stack's proxy), find the jobs running where, and restart a worker node that exits on
its own (``WorkerWatch``).

Shared by ``tasklab.lab.drill``, ``tasklab.lab.api_drill`` and ``tasklab.lab.soak``; it
imports none of them. Child processes (broker, workers) are started only by threads that
outlive them — the main thread, or the watch, which lives as long as the stack:
PR_SET_PDEATHSIG signals a child when the *thread* that started it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy import Engine

from tasklab.embedded import EmbeddedRedis
from tasklab.lab.errors import LabError
from tasklab.lab.harness import LabStack, WorkerConfig, WorkerNode
from tasklab.lab.netproxy import LinkProxy
from tasklab.settings import Settings

POLL_S = 0.05


def sigkill(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_node(node: WorkerNode) -> None:
    """SIGKILL a worker node, main process and pool children at once, as a crash would."""
    sigkill(node.pids())
    if node.process is not None:
        node.process.wait()


def restart_broker(server: EmbeddedRedis, *, down_s: float = 0.0) -> tuple[float, float]:
    """Stop the broker, wait ``down_s``, start it again empty on its port: (stopped, back)."""
    stopped_at = time.time()
    server.stop()
    time.sleep(down_s)
    server.start()
    return stopped_at, time.time()


# How a drill takes the broker away: ``stop`` the lab's own Redis (it comes back empty), or
# set the stack's broker link (``LabStack(links=True)``) to one of the proxy's modes.
BROKER_FAULTS = ("stop", "outage", "blackhole", "slow")
LINK_FAULTS = BROKER_FAULTS[1:]
DEFAULT_SLOW_MS = 200.0


def default_fault(settings: Settings) -> str:
    """``stop`` when the lab runs its own broker (no URL given), else ``outage`` by proxy."""
    return "stop" if settings.broker_url is None and settings.redis_url is None else "outage"


class BrokerCut:
    """Takes the broker away (``cut``) and brings it back (``heal``), by ``fault``."""

    def __init__(self, stack: LabStack, fault: str, *, delay_ms: float = DEFAULT_SLOW_MS) -> None:
        if fault not in BROKER_FAULTS:
            raise LabError(f"unknown broker fault {fault!r}; known: {', '.join(BROKER_FAULTS)}")
        self.fault = fault
        self.delay_ms = delay_ms
        self.server = own_broker(stack) if fault == "stop" else None
        self.link = None if fault == "stop" else _broker_link(stack)

    def cut(self) -> float:
        """Take the broker away; when it happened (epoch seconds)."""
        at = time.time()
        if self.server is not None:
            self.server.stop()
        elif self.link is not None:
            self.link.set_mode(self.fault, delay_ms=self.delay_ms)
        return at

    def heal(self) -> float:
        """Bring it back (the lab's own Redis: empty, on its port); when it was back."""
        if self.server is not None:
            self.server.start()
        elif self.link is not None:
            self.link.heal()
        return time.time()

    def during(self, down_s: float) -> tuple[float, float]:
        """Cut, wait ``down_s``, heal: (cut at, back at)."""
        at = self.cut()
        time.sleep(down_s)
        return at, self.heal()


def _broker_link(stack: LabStack) -> LinkProxy:
    if stack.links is None:
        raise LabError("a link fault needs the stack's proxies: LabStack(..., links=True)")
    return stack.links.broker


def own_broker(stack: LabStack) -> EmbeddedRedis:
    if stack.broker_server is None:
        raise LabError(
            "this drill stops and restarts the broker: it needs the lab's embedded Redis "
            "(unset REDIS_URL and BROKER_URL), or a link fault (outage, blackhole, slow)"
        )
    return stack.broker_server


def lease_pid(lease_owner: object) -> int:
    """The pid in a lease owner (``host:pid``, ``local:host:pid``), else 0."""
    pid = str(lease_owner or "").rsplit(":", 1)[-1]
    return int(pid) if pid.isdigit() else 0


def running_jobs(engine: Engine, owner: str | None = None) -> dict[str, int]:
    """STARTED jobs (of ``owner``) -> the pid in their lease owner (``host:pid``)."""
    from tasklab.jobs.records import JobStatus, jobs

    stmt = sa.select(jobs.c.id, jobs.c.lease_owner).where(jobs.c.status == JobStatus.STARTED.value)
    if owner is not None:
        stmt = stmt.where(jobs.c.owner == owner)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return {str(job_id): lease_pid(lease_owner) for job_id, lease_owner in rows}


def wait_for(predicate: Callable[[], bool], *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


class WorkerWatch(threading.Thread):
    """Restarts a worker node that exits on its own, as ``tasklab up``'s supervisor (or
    systemd) would, and records why it exited: a drill must not end because a worker did,
    and must say that one did. It lives as long as the stack: a child process is signalled
    when the *thread* that started it ends (PR_SET_PDEATHSIG)."""

    def __init__(self, stack: LabStack, config: WorkerConfig, *, interval_s: float = 0.2) -> None:
        super().__init__(name="lab-worker-watch", daemon=True)
        self.stack = stack
        self.config = config
        self.interval_s = interval_s
        self.lock = threading.Lock()  # held while nodes are killed, replaced or inspected
        self.exits: list[str] = []
        self._halt = threading.Event()

    def __enter__(self) -> WorkerWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(timeout=5)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            with self.lock:
                for node in [n for n in self.stack.nodes if n.exited]:
                    self.exits.append(exit_reason(node))
                    self.stack.nodes.remove(node)
                    self.stack.spawn(self.config)

    def kill(self, node: WorkerNode) -> None:
        """SIGKILL ``node`` on purpose (not an exit to report) and start its replacement."""
        with self.lock:
            kill_node(node)
            self.stack.nodes.remove(node)
            self.stack.spawn(self.config)  # boots while the reaper waits out the lease

    def nodes(self) -> list[WorkerNode]:
        with self.lock:
            return list(self.stack.nodes)


def exit_reason(node: WorkerNode) -> str:
    """The line of a worker's log that says why it stopped, else its exit code."""
    lines = node.log_tail(1_000_000).splitlines()  # the cause comes before its tracebacks
    fatal = [ln for ln in lines if "CRITICAL" in ln or "Unrecoverable" in ln]
    code = node.process.returncode if node.process is not None else None
    return (fatal[-1].strip() if fatal else f"exited with code {code}")[:300]
