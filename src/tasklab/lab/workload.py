"""Workloads and the two ways the lab runs them: raw Celery messages and durable tasklab jobs.

A ``Probe`` names what one task does (``noop``, ``sleep``, ``cpu``, ``mixed``, ``fail``,
``effect``, or any named task). A driver submits probes and collects one ``Sample`` per task
with its timestamps, from the result backend (``CeleryDriver``) or from the job records in SQL
(``JobsDriver``); ``tasklab.lab.summary`` turns samples into figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from tasklab.lab.errors import LabError

if TYPE_CHECKING:
    from tasklab.jobs import JobManager

# Raw Celery probes (tasklab.lab.probes) and durable probe jobs (tasklab.lab.probe_jobs).
CELERY_PROBES = {
    "noop": "tasklab.probe.noop",
    "noop_untracked": "tasklab.probe.noop_untracked",
    "counted_untracked": "tasklab.probe.counted_untracked",
    "sleep": "tasklab.probe.sleep",
    "io": "tasklab.probe.sleep",
    "cpu": "tasklab.probe.cpu",
    "mixed": "tasklab.probe.mixed",
    "fail": "tasklab.probe.fail",
}
NO_SENT_AT = {"fail"}  # probes that take no ``sent_at`` argument
JOB_PROBES = {
    "noop": "tasklab.probe_job.noop",
    "sleep": "tasklab.probe_job.sleep",
    "io": "tasklab.probe_job.sleep",
    "fail": "tasklab.probe_job.fail",
    "effect": "tasklab.probe_job.effect",
    "counted": "tasklab.probe_job.counted",
}
# How often collectors look for finished work. Latencies come from the records' own
# timestamps, not from when a poll saw them, so polling slower only saves the CPU that the
# measured workers would otherwise lose to the observer.
POLL_INTERVAL_S = 0.25
ID_CHUNK = 500  # ids per IN (...) query
Progress = Callable[[int], None]  # called with the number of tasks finished so far


@dataclass(frozen=True)
class Probe:
    """One task of a workload. ``label`` is what the caller expects of it (ok, flaky, fatal)."""

    kind: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    task: str | None = None  # a named task (``tune --task``) instead of a probe
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Ticket:
    """A submitted task: its id, when it was submitted and how long submitting took."""

    id: str
    sent_at: float
    submit_ms: float
    priority: int | None = None
    label: str = ""


@dataclass(frozen=True)
class Sample:
    """One task's outcome and timestamps (epoch seconds)."""

    id: str
    status: str  # succeeded | failed | dead | cancelled | lost
    sent_at: float
    started_at: float | None = None
    finished_at: float | None = None
    priority: int | None = None
    attempts: int = 1
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def queue_wait_ms(self) -> float | None:
        return None if self.started_at is None else max(0.0, self.started_at - self.sent_at) * 1e3

    @property
    def run_ms(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        return None if self.finished_at is None else max(0.0, self.finished_at - self.sent_at) * 1e3


class Driver(Protocol):
    """Submits probes one way (``via``) and collects their samples."""

    via: str

    def submit(self, probe: Probe, *, priority: int | None = None) -> Ticket: ...

    def collect(
        self, tickets: Sequence[Ticket], *, timeout_s: float, progress: Progress | None = None
    ) -> list[Sample]: ...


# --- raw Celery -----------------------------------------------------------------------------------


class CeleryDriver:
    """Probes as plain Celery tasks (``task.apply_async``, what ``delay()`` does), timestamps from
    the probe's return value in the result backend."""

    via = "celery"

    def __init__(
        self, app: Celery, *, queue: str, priority_of: Callable[[int], int] = lambda p: p
    ) -> None:
        self.app = app
        self.queue = queue
        self.priority_of = priority_of

    def submit(self, probe: Probe, *, priority: int | None = None) -> Ticket:
        name = probe.task or _probe_name(CELERY_PROBES, probe.kind)
        kwargs = dict(probe.kwargs)
        options: dict[str, Any] = {"queue": self.queue}
        if priority is not None:
            options["priority"] = self.priority_of(priority)
        sent_at = time.time()
        if probe.task is None and probe.kind not in NO_SENT_AT:
            kwargs["sent_at"] = sent_at
        started = time.perf_counter()
        task = self.app.tasks.get(name)
        if task is not None:
            result = task.apply_async(probe.args, kwargs, **options)
        else:
            result = self.app.send_task(name, args=probe.args, kwargs=kwargs, **options)
        submit_ms = (time.perf_counter() - started) * 1e3
        return Ticket(result.id, sent_at, submit_ms, priority, probe.label)

    def collect(
        self, tickets: Sequence[Ticket], *, timeout_s: float, progress: Progress | None = None
    ) -> list[Sample]:
        backend = self.app.backend
        if not hasattr(backend, "get_many"):
            return self._collect_one_by_one(tickets, timeout_s, progress)
        by_id = {t.id: t for t in tickets}
        samples: list[Sample] = []
        tick = (lambda: progress(len(samples))) if progress else None
        try:
            for task_id, meta in backend.get_many(
                list(by_id), timeout=timeout_s, interval=POLL_INTERVAL_S, on_interval=tick
            ):
                samples.append(_celery_sample(by_id[task_id], meta))
                if progress is not None and len(samples) % 50 == 0:
                    progress(len(samples))
        except CeleryTimeout:
            pass
        return _with_lost(samples, tickets, progress)

    def _collect_one_by_one(
        self, tickets: Sequence[Ticket], timeout_s: float, progress: Progress | None
    ) -> list[Sample]:
        deadline = time.monotonic() + timeout_s
        samples: list[Sample] = []
        for ticket in tickets:
            result = self.app.AsyncResult(ticket.id)
            try:
                result.get(timeout=max(0.01, deadline - time.monotonic()), propagate=False)
            except CeleryTimeout:
                break
            meta = {"status": result.state, "result": result.result, "date_done": result.date_done}
            samples.append(_celery_sample(ticket, meta))
            if progress is not None:
                progress(len(samples))
        return _with_lost(samples, tickets, progress)


def _probe_name(table: Mapping[str, str], kind: str) -> str:
    try:
        return table[kind]
    except KeyError:
        raise LabError(f"no {kind!r} probe here; known: {sorted(table)}") from None


def _celery_sample(ticket: Ticket, meta: Mapping[str, Any]) -> Sample:
    value = meta.get("result")
    done = _epoch(meta.get("date_done"))
    status = "succeeded" if meta.get("status") == "SUCCESS" else "failed"
    started = finished = None
    if isinstance(value, dict) and "finished_at" in value:
        started, finished = value.get("started_at"), value.get("finished_at")
    else:
        finished = done  # a named task: only the backend's completion time is known
    return Sample(
        ticket.id,
        status,
        ticket.sent_at,
        started,
        finished or done,
        ticket.priority,
        label=ticket.label,
    )


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _with_lost(
    samples: list[Sample], tickets: Sequence[Ticket], progress: Progress | None
) -> list[Sample]:
    seen = {s.id for s in samples}
    lost = [
        Sample(t.id, "lost", t.sent_at, priority=t.priority, label=t.label)
        for t in tickets
        if t.id not in seen
    ]
    if progress is not None:
        progress(len(samples))
    return samples + lost


# --- durable tasklab jobs -------------------------------------------------------------------------

_JOB_STATUS = {"SUCCEEDED": "succeeded", "DEAD": "dead", "CANCELLED": "cancelled"}


class JobsDriver:
    """Probes as durable jobs (``JobManager.submit``); timestamps from the job records.

    Every job of one driver carries the same ``owner``, so a batch is found (and its ledger
    computed) with one indexed query."""

    via = "jobs"

    def __init__(self, manager: JobManager, *, owner: str, queue: str | None = None) -> None:
        self.manager = manager
        self.owner = owner
        self.queue = queue

    def submit(self, probe: Probe, *, priority: int | None = None) -> Ticket:
        name = probe.task or _probe_name(JOB_PROBES, probe.kind)
        started = time.perf_counter()
        job = self.manager.submit(
            name,
            *probe.args,
            queue=self.queue,
            priority=priority,
            owner=self.owner,
            **dict(probe.kwargs),
        )
        submit_ms = (time.perf_counter() - started) * 1e3
        return Ticket(job.id, job.created_at, submit_ms, job.priority, probe.label)

    def finished_count(self, ids: Sequence[str]) -> int:
        """How many of ``ids`` are in a final state (one indexed query per 500 ids)."""
        from tasklab.jobs.records import FINAL, jobs

        final = [s.value for s in FINAL]
        total = 0
        with self.manager.engine.connect() as conn:
            for start in range(0, len(ids), ID_CHUNK):
                stmt = (
                    sa.select(sa.func.count())
                    .select_from(jobs)
                    .where(jobs.c.id.in_(ids[start : start + ID_CHUNK]), jobs.c.status.in_(final))
                )
                total += int(conn.execute(stmt).scalar_one())
        return total

    def owner_finished_count(self) -> int:
        """Jobs of this driver's owner in a final state: one query on the owner index."""
        from tasklab.jobs.records import FINAL, jobs

        stmt = (
            sa.select(sa.func.count())
            .select_from(jobs)
            .where(jobs.c.owner == self.owner, jobs.c.status.in_([s.value for s in FINAL]))
        )
        with self.manager.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def collect(
        self, tickets: Sequence[Ticket], *, timeout_s: float, progress: Progress | None = None
    ) -> list[Sample]:
        deadline = time.monotonic() + timeout_s
        ids = [t.id for t in tickets]
        while True:
            # The cheap owner count first; the exact per-id count only when it says "all"
            # (the same owner may hold earlier batches).
            seen = self.owner_finished_count()
            done = self.finished_count(ids) if seen >= len(ids) else min(seen, len(ids) - 1)
            if done >= len(ids) or time.monotonic() >= deadline:
                break
            if progress is not None:
                progress(done)
            time.sleep(POLL_INTERVAL_S)
        if progress is not None:
            progress(done)
        return self.samples(tickets)

    def samples(self, tickets: Sequence[Ticket]) -> list[Sample]:
        from tasklab.jobs.records import jobs

        c = jobs.c
        stmt = sa.select(
            c.id, c.status, c.created_at, c.started_at, c.finished_at, c.priority, c.attempt
        ).where(c.owner == self.owner)
        with self.manager.engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(stmt)}
        out = []
        for t in tickets:
            row = rows.get(t.id)
            if row is None:
                out.append(Sample(t.id, "lost", t.sent_at, label=t.label))
                continue
            out.append(
                Sample(
                    t.id,
                    _JOB_STATUS.get(row.status, "lost"),
                    row.created_at,
                    row.started_at,
                    row.finished_at,
                    row.priority,
                    row.attempt,
                    t.label,
                )
            )
        return out


def submit_all(
    driver: Driver,
    probes: Sequence[Probe],
    *,
    priorities: Sequence[int | None] | None = None,
    submitters: int = 1,
) -> list[Ticket]:
    """Submit every probe, from ``submitters`` threads when more than one (order kept)."""
    prios: Sequence[int | None] = priorities or [None] * len(probes)
    if submitters <= 1:
        return [driver.submit(p, priority=q) for p, q in zip(probes, prios, strict=True)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(submitters, thread_name_prefix="lab-submit") as pool:
        return list(
            pool.map(
                lambda pq: driver.submit(pq[0], priority=pq[1]), zip(probes, prios, strict=True)
            )
        )
