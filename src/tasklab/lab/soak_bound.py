"""How long a job whose carrier died may take, and whether it kept to it (the soak drill).

A job's *carrier* is whatever holds it on its way to a worker: the worker process running it,
the worker that holds its message reserved (prefetched, or in a bundle not run yet), the relay
of the process that submitted it. When the carrier dies (SIGKILL) the job layer must bring the
job back by itself: the reaper re-queues a running job once its lease expires (``lease_s``,
seen within a ``reaper_interval_s`` tick), and publishes again a queued job whose message is
gone (``requeue_after_s``, within a tick). Once back in the queue, the job waits like any job
offered at that moment, then runs. So, from the fault to its finish, it may take::

    bound = lease_s + requeue_after_s + reaper_interval_s + queue_wait + its own run time

``queue_wait`` is what comparable, unaffected jobs waited at that time: the longest queue
wait (start - submit) of the jobs that were offered while the recovered job could be coming
back, between the fault and the fault + ``lease_s + requeue_after_s + reaper_interval_s``,
and ran once, from the broker, and succeeded. A job that comes back into the queue waits
behind the same backlog as a job offered at that moment (the same queue, the same priority:
first in, first out). When no such job was offered in that window (the offer had ended), the
last ``FALLBACK_JOBS`` offered before its end stand in: after the offer the backlog only
shrinks, so their wait is an upper bound for a job queued later.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasklab.settings import Settings

FALLBACK_JOBS = 10
FINAL = ("SUCCEEDED", "DEAD", "CANCELLED")
Row = Mapping[str, Any]  # status, attempt, via, created_at, started_at, finished_at


def recovery_s(settings: Settings) -> float:
    """The job layer's own share of the bound: a lease, a re-queue age and a reaper tick."""
    return settings.lease_s + settings.requeue_after_s + settings.reaper_interval_s


@dataclass(frozen=True)
class Carried:
    """A job whose carrier died at ``fault_at`` (epoch s); ``group`` names the carrier."""

    job_id: str
    group: str  # worker_running | worker_reserved | relay | terminated
    fault_at: float


@dataclass(frozen=True)
class Verdict:
    job_id: str
    group: str
    fault_at: float
    status: str
    latency_s: float | None  # fault -> finished; None: not finished
    queue_wait_s: float  # the comparable jobs' (see the module's docstring)
    run_s: float  # its own last attempt's run time
    bound_s: float

    @property
    def over(self) -> bool:
        return self.latency_s is None or self.latency_s > self.bound_s

    @property
    def margin_s(self) -> float | None:
        return None if self.latency_s is None else self.bound_s - self.latency_s


def comparable_wait_s(
    rows: Mapping[str, Row], *, fault_at: float, window_s: float, exclude: Collection[str]
) -> float | None:
    """The longest queue wait of the unaffected jobs offered in [fault, fault + window]
    (or of the last ones offered before its end); None if there is none."""
    eligible = [
        r
        for job_id, r in rows.items()
        if job_id not in exclude
        and r["status"] == "SUCCEEDED"
        and int(r["attempt"]) == 1
        and r["via"] == "broker"
        and r["started_at"] is not None
    ]
    end = fault_at + window_s
    chosen = [r for r in eligible if fault_at <= r["created_at"] <= end]
    if not chosen:
        before = sorted((r for r in eligible if r["created_at"] <= end), key=_created)
        chosen = before[-FALLBACK_JOBS:]
    if not chosen:
        return None
    return max(max(0.0, float(r["started_at"]) - float(r["created_at"])) for r in chosen)


def judge(
    carried: Sequence[Carried],
    rows: Mapping[str, Row],
    comparable: Mapping[str, Row],
    *,
    recovery_s: float,
) -> list[Verdict]:
    """One verdict per carried job. ``rows``: the carried jobs' records; ``comparable``: the
    jobs offered in the open loop (the carried ones are left out of them)."""
    exclude = {c.job_id for c in carried}
    waits: dict[float, float] = {}
    out: list[Verdict] = []
    for c in carried:
        if c.fault_at not in waits:
            wait = comparable_wait_s(
                comparable, fault_at=c.fault_at, window_s=recovery_s, exclude=exclude
            )
            waits[c.fault_at] = wait or 0.0
        row = rows.get(c.job_id) or {}
        status = str(row.get("status", "missing"))
        finished = row.get("finished_at") if status in FINAL else None
        started = row.get("started_at")
        run_s = max(0.0, finished - started) if finished is not None and started else 0.0
        out.append(
            Verdict(
                job_id=c.job_id,
                group=c.group,
                fault_at=c.fault_at,
                status=status,
                latency_s=None if finished is None else max(0.0, finished - c.fault_at),
                queue_wait_s=waits[c.fault_at],
                run_s=run_s,
                bound_s=recovery_s + waits[c.fault_at] + run_s,
            )
        )
    return out


def _created(row: Row) -> float:
    return float(row["created_at"])
