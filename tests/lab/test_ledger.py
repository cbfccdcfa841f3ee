from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine

from tasklab.database import make_engine
from tasklab.jobs.records import JobStatus, effects, jobs
from tasklab.lab.ledger import cancel_waiting, take_ledger
from tasklab.migrations import migrate
from tasklab.settings import Settings


def engine_with(
    tmp_path: Path,
    rows: list[tuple[str, JobStatus, int, int]],
    *,
    task: str = "tasklab.probe_job.effect",
    owner: str = "lab:t",
) -> Engine:
    """Jobs (id, status, attempt, effect rows) of ``owner``, all of ``task``."""
    settings = Settings(home_dir=tmp_path)
    migrate(settings)
    engine = make_engine(settings)
    now = time.time()
    with engine.begin() as conn:
        for job_id, status, attempt, n_effects in rows:
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    task=task,
                    args=[],
                    kwargs={},
                    queue="default",
                    priority=5,
                    owner=owner,
                    status=status.value,
                    attempt=attempt,
                    max_attempts=3,
                    created_at=now,
                )
            )
            for a in range(n_effects):
                conn.execute(effects.insert().values(job_id=job_id, attempt=a + 1, created_at=now))
    return engine


def test_a_settled_batch_balances_with_nothing_lost_and_no_duplicate_effect(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path,
        [
            ("a", JobStatus.SUCCEEDED, 1, 1),
            ("b", JobStatus.SUCCEEDED, 2, 1),
            ("c", JobStatus.DEAD, 2, 0),
            ("d", JobStatus.CANCELLED, 0, 0),
        ],
    )
    ledger = take_ledger(engine, owner="lab:t")
    assert (ledger.submitted, ledger.succeeded, ledger.dead, ledger.cancelled) == (4, 2, 1, 1)
    assert ledger.balanced and ledger.ok
    assert ledger.retried == 2 and ledger.effects == 2 and ledger.duplicate_effects == 0


def test_a_job_missing_from_sql_or_unfinished_after_settling_is_lost(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path, [("a", JobStatus.SUCCEEDED, 1, 1), ("b", JobStatus.QUEUED, 0, 0)]
    )
    settled = take_ledger(engine, owner="lab:t", submitted_ids=["a", "b", "ghost"])
    assert settled.recorded == 2 and settled.in_flight == 1 and settled.lost == 2
    assert not settled.ok
    running = take_ledger(engine, owner="lab:t", submitted_ids=["a", "b"], settled=False)
    assert running.lost == 0 and running.in_flight == 1


def test_an_effect_applied_twice_is_counted_as_a_duplicate(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, [("a", JobStatus.SUCCEEDED, 2, 2)])
    ledger = take_ledger(engine, owner="lab:t")
    assert ledger.duplicate_effects == 1 and not ledger.ok
    assert ledger.figures()["ledger_duplicate_effects"] == 1.0


def test_cancelling_a_batch_touches_only_jobs_that_have_not_started(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path,
        [
            ("a", JobStatus.QUEUED, 0, 0),
            ("b", JobStatus.STARTED, 1, 0),
            ("c", JobStatus.SUCCEEDED, 1, 1),
        ],
    )
    assert cancel_waiting(engine, owner="lab:t") == 1
    ledger = take_ledger(engine, owner="lab:t", settled=False)
    assert (ledger.cancelled, ledger.in_flight, ledger.succeeded) == (1, 1, 1)


def test_a_succeeded_effect_job_without_its_effect_row_is_a_missing_effect(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path,
        [
            ("a", JobStatus.SUCCEEDED, 1, 1),
            ("b", JobStatus.SUCCEEDED, 1, 0),  # completed, its effect never committed
            ("c", JobStatus.CANCELLED, 1, 0),  # no effect expected
            ("d", JobStatus.DEAD, 5, 0),
        ],
    )
    ledger = take_ledger(engine, owner="lab:t")
    assert ledger.missing_effects == 1 and ledger.duplicate_effects == 0
    assert ledger.balanced and ledger.lost == 0 and not ledger.ok
    assert ledger.figures()["ledger_missing_effects"] == 1.0
    assert take_ledger(engine, owner="lab:t", submitted_ids=["a", "c"]).missing_effects == 0


def test_only_effect_writing_tasks_can_miss_an_effect(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path, [("n", JobStatus.SUCCEEDED, 1, 0)], task="tasklab.probe_job.noop"
    )
    assert take_ledger(engine, owner="lab:t").missing_effects == 0
    ledger = take_ledger(engine, owner="lab:t", effect_tasks={"tasklab.probe_job.noop"})
    assert ledger.missing_effects == 1


def test_two_batches_ledgers_add_up(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path, [("a", JobStatus.SUCCEEDED, 1, 2), ("b", JobStatus.QUEUED, 0, 0)]
    )
    one = take_ledger(engine, owner="lab:t", submitted_ids=["a"], settled=False)
    two = take_ledger(engine, owner="lab:t", submitted_ids=["b", "ghost"], settled=False)
    both = one + two
    assert (both.submitted, both.recorded, both.succeeded, both.in_flight) == (3, 2, 1, 1)
    assert (both.lost, both.duplicate_effects, both.effects) == (1, 1, 2)
