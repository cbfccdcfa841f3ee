"""The ledger of a batch of durable jobs: where every accepted job ended up, from SQL alone.

Every drill and stress scenario ends with it. The invariants it proves:
``submitted == succeeded + dead + cancelled``, ``lost == 0``, ``duplicate_effects == 0`` and
``missing_effects == 0`` (effects counted in ``tasklab_effects``, written only through
``job.transaction()``: a job of an effect-writing task — ``EFFECT_TASKS`` — that SUCCEEDED
must have exactly one row; none means its completion committed without its effect).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from tasklab.database import writing
from tasklab.jobs.records import CLAIMABLE, FINAL, JobStatus, effects, jobs

_CHUNK = 500  # ids per IN (...) query
# Tasks whose every successful run writes exactly one row to tasklab_effects.
EFFECT_TASKS = frozenset({"tasklab.probe_job.effect"})


@dataclass(frozen=True)
class Ledger:
    submitted: int  # ids submit() returned to the caller
    recorded: int  # of those, found in SQL
    succeeded: int
    dead: int
    cancelled: int
    in_flight: int  # PENDING/QUEUED/STARTED/RETRYING when the ledger was taken
    lost: int  # missing from SQL, or (once settled) still not final
    retried: int  # jobs that took more than one attempt
    effects: int  # rows in tasklab_effects for the batch
    duplicate_effects: int  # effect rows beyond the first, per job
    missing_effects: int = 0  # SUCCEEDED jobs of an effect-writing task without an effect row

    @property
    def balanced(self) -> bool:
        return self.submitted == self.succeeded + self.dead + self.cancelled

    @property
    def ok(self) -> bool:
        return (
            self.balanced
            and self.lost == 0
            and self.duplicate_effects == 0
            and self.missing_effects == 0
        )

    def __add__(self, other: Ledger) -> Ledger:
        """Two batches' ledgers as one (e.g. the jobs of two submitting processes)."""
        mine, theirs = asdict(self), asdict(other)
        return Ledger(**{k: mine[k] + theirs[k] for k in mine})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "balanced": self.balanced}

    def figures(self) -> dict[str, float]:
        return {f"ledger_{k}": float(v) for k, v in asdict(self).items()}


def take_ledger(
    engine: Engine,
    *,
    owner: str,
    submitted_ids: Sequence[str] | None = None,
    settled: bool = True,
    effect_tasks: Collection[str] = EFFECT_TASKS,
) -> Ledger:
    """The ledger of the jobs of ``owner``. ``submitted_ids`` are the ids the caller was given
    (default: every job of the owner); with ``settled`` the caller has waited long enough, so
    an unfinished job counts as lost. ``effect_tasks``: the tasks whose successful runs each
    wrote one effect row (their SUCCEEDED jobs without one are ``missing_effects``)."""
    rows = _rows(engine, owner)
    ids = list(submitted_ids) if submitted_ids is not None else list(rows)
    found = {i: rows[i] for i in ids if i in rows}
    status = [r[0] for r in found.values()]
    in_flight = sum(1 for s in status if JobStatus(s) not in FINAL)
    missing = len(ids) - len(found)
    per_job = _effects_per_job(engine, ids)
    return Ledger(
        submitted=len(ids),
        recorded=len(found),
        succeeded=status.count(JobStatus.SUCCEEDED.value),
        dead=status.count(JobStatus.DEAD.value),
        cancelled=status.count(JobStatus.CANCELLED.value),
        in_flight=in_flight,
        lost=missing + (in_flight if settled else 0),
        retried=sum(1 for r in found.values() if r[1] > 1),
        effects=sum(per_job.values()),
        duplicate_effects=sum(max(0, n - 1) for n in per_job.values()),
        missing_effects=sum(
            1
            for job_id, (st, _, task) in found.items()
            if st == JobStatus.SUCCEEDED.value and task in effect_tasks and not per_job.get(job_id)
        ),
    )


def _rows(engine: Engine, owner: str) -> dict[str, tuple[str, int, str]]:
    """id -> (status, attempt, task) of every job of ``owner``."""
    stmt = sa.select(jobs.c.id, jobs.c.status, jobs.c.attempt, jobs.c.task).where(
        jobs.c.owner == owner
    )
    with engine.connect() as conn:
        return {r.id: (r.status, int(r.attempt), r.task) for r in conn.execute(stmt)}


def _effects_per_job(engine: Engine, ids: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            stmt = (
                sa.select(effects.c.job_id, sa.func.count())
                .where(effects.c.job_id.in_(chunk))
                .group_by(effects.c.job_id)
            )
            counts.update({job_id: int(n) for job_id, n in conn.execute(stmt)})
    return counts


def cancel_waiting(engine: Engine, *, owner: str) -> int:
    """Cancel every job of ``owner`` that has not started (a lab cleanup, e.g. after jobs were
    queued only to weigh them in Redis). Returns how many were cancelled."""
    stmt = (
        jobs.update()
        .where(jobs.c.owner == owner, jobs.c.status.in_([s.value for s in CLAIMABLE]))
        .values(status=JobStatus.CANCELLED.value, finished_at=time.time(), cancel_requested=True)
    )
    with writing(engine) as conn:
        return int(conn.execute(stmt).rowcount)
