"""The soak drill's instruments: the open-loop offer, what the broker and a worker node carry,
the submitting process it SIGKILLs, and a sampler of the backlog.

- ``OpenLoop`` submits on a fixed schedule (``rate_per_s``, in groups every ``tick_s``),
  never waiting for a job to finish: arrivals do not slow down when the workers fall behind.
- ``scan_broker`` reads every message waiting in the Redis broker (the queues' lists) or
  delivered and not acknowledged (kombu's ``unacked`` hash): job id -> ids of the messages
  that carry it.
- ``node_messages`` asks one worker node (``inspect``) for the messages it runs and holds
  reserved (prefetched): message id -> its job ids, a bundle's or a single job's.
- ``Victim`` is a separate submitting process (``tasklab.lab.soak_submitter``): started before
  the offer, told to stream, frozen (SIGSTOP) until the broker shows that jobs it committed
  were never published — its relay holds them — then SIGKILLed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import redis
import sqlalchemy as sa
from sqlalchemy import Engine

from tasklab.celery_app import QUEUES
from tasklab.jobs.publisher import BUNDLE_TASK
from tasklab.lab.faults import lease_pid
from tasklab.lab.harness import LabStack, WorkerNode
from tasklab.lab.workload import JobsDriver, Probe, Ticket
from tasklab.processes import die_with_parent
from tasklab.settings import to_env
from tasklab.supervisor import child_env

UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, not acknowledged
PRIORITY_SEP = ":"  # tasklab's broker_transport_options "sep"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
READY_TIMEOUT_S = 60.0
WAITING = ("PENDING", "QUEUED", "RETRYING")  # recorded, not running, not final


class OpenLoop(threading.Thread):
    """Offers ``round(rate_per_s * duration_s)`` jobs on a fixed schedule: job ``i`` is due
    ``i / rate_per_s`` after the start; every ``tick_s`` the jobs due in that tick are
    submitted back to back (a web backend's requests each submit a few jobs at once; the
    relay gathers them into bundles). A late tick is caught up at once, never skipped."""

    def __init__(
        self,
        driver: JobsDriver,
        probe: Probe,
        *,
        rate_per_s: float,
        duration_s: float,
        tick_s: float,
        update: Callable[[int], None],
    ) -> None:
        super().__init__(name="lab-open-loop", daemon=True)
        self.driver = driver
        self.probe = probe
        self.rate_per_s = rate_per_s
        self.tick_s = tick_s
        self.planned = max(1, round(rate_per_s * duration_s))
        self.update = update
        self.tickets: list[Ticket] = []
        self.refused = 0  # submits that raised: refused to the caller, so not lost
        self.lag_s_max = 0.0  # how late a tick's first submit was, at worst
        self.started_at = 0.0
        self.ended_at = 0.0

    def run(self) -> None:
        start = time.monotonic()
        self.started_at = time.time()
        done, k = 0, 0
        while done < self.planned:
            due = start + k * self.tick_s
            time.sleep(max(0.0, due - time.monotonic()))
            self.lag_s_max = max(self.lag_s_max, time.monotonic() - due)
            upto = min(self.planned, math.ceil((k + 1) * self.tick_s * self.rate_per_s))
            for _ in range(done, upto):
                try:
                    self.tickets.append(self.driver.submit(self.probe))
                except Exception:
                    self.refused += 1
            done, k = max(done, upto), k + 1
            self.update(done)
        self.ended_at = time.time()


# --- what the broker and the workers carry ---------------------------------------------------


def message_jobs(message: dict[str, Any]) -> tuple[str, list[str]]:
    """(message id, job ids) of one kombu Redis message of a job or a bundle task."""
    headers = message.get("headers") or {}
    body: Any = message.get("body", "")
    if (message.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    try:
        args = json.loads(body)[0]
    except (ValueError, IndexError, TypeError):
        return str(headers.get("id", "")), []
    return str(headers.get("id", "")), request_jobs(str(headers.get("task", "")), args)


def request_jobs(task: str, args: Any) -> list[str]:
    """The job ids in a job task's or bundle task's arguments."""
    if not isinstance(args, list | tuple) or not args:
        return []
    ids: list[Any] = []
    if task == BUNDLE_TASK:
        ids = list(args[1]) if len(args) > 1 and isinstance(args[1], list) else []
    else:
        ids = list(args[:1])
    return [str(i) for i in ids if _JOB_ID.match(str(i))]


def scan_broker(client: redis.Redis) -> dict[str, set[str]]:
    """job id -> ids of the messages in the broker that carry it (waiting, or delivered and
    not acknowledged). The lists are read before the unacked hash: a message delivered in
    between is found in the hash."""
    keys = [q if p == 0 else f"{q}{PRIORITY_SEP}{p}" for q in QUEUES for p in range(10)]
    carried: defaultdict[str, set[str]] = defaultdict(set)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.lrange(key, 0, -1)
    raws: list[Any] = [raw for items in pipe.execute() for raw in items]
    for raw in client.hvals(UNACKED_KEY):
        try:
            raws.append(json.loads(raw)[0])
        except (ValueError, IndexError, TypeError):
            continue
    for raw in raws:
        try:
            message = raw if isinstance(raw, dict) else json.loads(raw)
        except ValueError:
            continue
        message_id, ids = message_jobs(message)
        for job_id in ids:
            carried[job_id].add(message_id)
    return dict(carried)


def scan_twice(client: redis.Redis, pause_s: float = 0.2) -> dict[str, set[str]]:
    """Two scans, merged: a message popped by a worker during the first (out of its list,
    not yet in the unacked hash) is in the hash by the second."""
    first = scan_broker(client)
    time.sleep(pause_s)
    for job_id, messages in scan_broker(client).items():
        first.setdefault(job_id, set()).update(messages)
    return first


def node_hostname(node: WorkerNode) -> str:
    import socket

    return node.hostname or f"{node.name}@{socket.gethostname()}"


@dataclass
class NodeMessages:
    """What one worker node runs (``active``) and holds prefetched (``reserved``)."""

    active: dict[str, list[str]] = field(default_factory=dict)  # message id -> job ids
    reserved: dict[str, list[str]] = field(default_factory=dict)

    @property
    def all(self) -> dict[str, list[str]]:
        return {**self.active, **self.reserved}

    @property
    def bundles(self) -> int:
        return sum(1 for ids in self.all.values() if len(ids) > 1)


def node_messages(stack: LabStack, node: WorkerNode, timeout_s: float = 1.0) -> NodeMessages | None:
    """The node's messages, or None if it did not answer. A connection of its own each time:
    a pooled one may date from before a broker restart."""
    host = node_hostname(node)
    try:
        with stack.celery.connection_for_write() as conn:
            inspect = stack.celery.control.inspect(
                destination=[host], timeout=timeout_s, connection=conn
            )
            active, reserved = inspect.active(), inspect.reserved()
    except Exception:  # the broker is restarting; ask again later
        return None
    if not active or not reserved or host not in active or host not in reserved:
        return None
    out = NodeMessages()
    for target, requests in ((out.active, active[host]), (out.reserved, reserved[host])):
        for r in requests:
            target[str(r.get("id"))] = request_jobs(str(r.get("name", "")), r.get("args"))
    return out


def job_rows(engine: Engine, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """id -> its record's status, attempt, lease owner, via and timestamps."""
    from tasklab.jobs.records import jobs

    c = jobs.c
    cols = [c.id, c.status, c.attempt, c.lease_owner, c.via, c.created_at, c.started_at]
    out: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), 500):
            stmt = sa.select(*cols, c.finished_at).where(c.id.in_(list(ids[start : start + 500])))
            out.update({str(r.id): dict(r._mapping) for r in conn.execute(stmt)})
    return out


def owner_rows(engine: Engine, owner: str) -> dict[str, dict[str, Any]]:
    from tasklab.jobs.records import jobs

    c = jobs.c
    stmt = sa.select(
        c.id, c.status, c.attempt, c.via, c.created_at, c.started_at, c.finished_at
    ).where(c.owner == owner)
    with engine.connect() as conn:
        return {str(r.id): dict(r._mapping) for r in conn.execute(stmt)}


def started_jobs(engine: Engine) -> dict[str, tuple[int, float]]:
    """STARTED jobs -> (the pid in their lease owner, when the attempt started)."""
    from tasklab.jobs.records import JobStatus, jobs

    stmt = sa.select(jobs.c.id, jobs.c.lease_owner, jobs.c.started_at).where(
        jobs.c.status == JobStatus.STARTED.value
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return {str(r.id): (lease_pid(r.lease_owner), float(r.started_at or 0.0)) for r in rows}


def latest_waiting(engine: Engine, owner: str, n: int, avoid: set[str]) -> list[str]:
    """The newest ``n`` jobs of ``owner`` still waiting (never started), not in ``avoid``."""
    from tasklab.jobs.records import jobs

    stmt = (
        sa.select(jobs.c.id)
        .where(jobs.c.owner == owner, jobs.c.status.in_(WAITING), jobs.c.started_at.is_(None))
        .order_by(jobs.c.created_at.desc())
        .limit(n + len(avoid))
    )
    with engine.connect() as conn:
        ids = [str(r[0]) for r in conn.execute(stmt)]
    return [j for j in ids if j not in avoid][:n]


def not_final(engine: Engine, owners: Sequence[str]) -> int:
    """How many jobs of ``owners`` are not final."""
    from tasklab.jobs.records import FINAL, jobs

    stmt = (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.owner.in_(list(owners)), jobs.c.status.not_in([s.value for s in FINAL]))
    )
    with engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


# --- the submitting process that dies -------------------------------------------------------


class Victim:
    """A submitting process of its own (its own ``JobManager`` and relay) for the drill to
    SIGKILL mid-stream; the ids ``submit()`` returned to it are in ``ids_path``."""

    def __init__(
        self, stack: LabStack, *, owner: str, jobs: int, hold_s: float, log_dir: Path
    ) -> None:
        self.stack = stack
        self.owner = owner
        self.jobs = jobs
        self.hold_s = hold_s
        log_dir.mkdir(parents=True, exist_ok=True)
        self.ids_path = log_dir / f"soak-submitter-{stack.run_id}.ids"
        self.log_path = log_dir / f"soak-submitter-{stack.run_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start it (from the main thread: it dies with the thread that started it)."""
        self.ids_path.unlink(missing_ok=True)
        ready = Path(f"{self.ids_path}.ready")
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "tasklab.lab.soak_submitter", "--owner", self.owner]
        argv += ["--ids", str(self.ids_path), "--jobs", str(self.jobs)]
        argv += ["--hold-s", str(self.hold_s)]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv,
            env=child_env(to_env(self.stack.settings)),
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the soak's submitter did not start; see {self.log_path}")
            time.sleep(0.05)

    def go(self) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def accepted(self) -> list[str]:
        """The ids submit() returned to it (whole lines only: a line cut by the kill is not
        an id it was given)."""
        try:
            text = self.ids_path.read_text()
        except OSError:
            return []
        return [line for line in text.split("\n")[:-1] if _JOB_ID.match(line)]

    def wait_accepted(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.ids_path.stat().st_size >= 33 * n:  # 32 hex digits and a newline
                    return True
            if self.process is None or self.process.poll() is not None:
                return False
            time.sleep(0.01)
        return False

    def kill_holding(
        self, unpublished: Callable[[], list[str]], *, tries: int = 20
    ) -> tuple[float, list[str], int]:
        """Freeze the process (SIGSTOP), look for jobs it committed that never reached the
        broker; SIGKILL it when there are some (else let it run a few ms more and look
        again). Returns (when it was frozen for good, those jobs, how many looks)."""
        assert self.process is not None
        proc = psutil.Process(self.process.pid)
        held: list[str] = []
        frozen_at = time.time()
        n = 0
        for n in range(1, tries + 1):
            frozen_at = time.time()
            os.kill(proc.pid, signal.SIGSTOP)
            _wait_stopped(proc)
            held = unpublished()
            if held or n == tries or self.process.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(random.uniform(0.005, 0.03))
        self.kill()
        return frozen_at, held, n

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process is not None and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def _wait_stopped(proc: psutil.Process, timeout_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if proc.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                return
        except psutil.Error:
            return
        time.sleep(0.002)


# --- the backlog over time --------------------------------------------------------------------


class BacklogSampler(threading.Thread):
    """Every ``interval_s``: the jobs of ``owners`` not final yet, and the messages waiting in
    the broker (one grouped query, one pipeline of LLENs)."""

    def __init__(self, stack: LabStack, owners: Sequence[str], *, interval_s: float = 1.0) -> None:
        super().__init__(name="lab-backlog", daemon=True)
        self.stack = stack
        self.owners = list(owners)
        self.interval_s = interval_s
        self.t0 = time.time()
        self.jobs: list[tuple[float, float]] = []
        self.depth: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def __enter__(self) -> BacklogSampler:
        self.t0 = time.time()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(timeout=5)

    def run(self) -> None:
        from tasklab.jobs.records import FINAL, jobs

        stmt = (
            sa.select(sa.func.count())
            .select_from(jobs)
            .where(jobs.c.owner.in_(self.owners), jobs.c.status.not_in([s.value for s in FINAL]))
        )
        while not self._halt.wait(self.interval_s):
            now = round(time.time() - self.t0, 3)
            try:
                with self.stack.jobs.engine.connect() as conn:
                    self.jobs.append((now, float(conn.execute(stmt).scalar_one())))
            except Exception:  # a busy database is not the sampler's business
                continue
            depth = self.stack.queue_depth()
            if depth is not None:
                self.depth.append((now, float(depth)))
