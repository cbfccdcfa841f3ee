"""The reference service's worker jobs (listed in ``celery_app.TASK_MODULES``)."""

from __future__ import annotations

from typing import Any

from tasklab.jobs import JobContext, JobSpec, job
from tasklab.service.domain import scheduled  # noqa: F401  (registers beat's shop tasks)
from tasklab.service.domain.settlement import gave_up, order_lines, settle_order
from tasklab.service.domain.sync import run_sync

DATA_SYNC_QUEUE = "data_sync"


def _process_order(ctx: JobContext, order_id: int) -> dict[str, Any]:
    """Deduct stock and points for a pending order, or reject it, exactly once. If the job
    gives up (DEAD or CANCELLED), ``gave_up`` rejects the order (``settlement_failed``) in the
    same transaction; retrying the job settles it then."""
    with ctx.engine.connect() as conn:
        lines = order_lines(conn, order_id)
    with ctx.transaction() as session:
        outcome = settle_order(session, order_id, lines)
    return outcome


def _sync_batch(ctx: JobContext, file_ids: list[int]) -> dict[str, Any]:
    """Load a platform's files (chosen when the batch was requested)."""
    return run_sync(ctx, file_ids)


def _sync_file(ctx: JobContext, file_id: int) -> dict[str, Any]:
    return run_sync(ctx, [file_id])


# Declared by call rather than as decorators so that mypy sees JobSpecs (``job`` is untyped).
process_order: JobSpec = job(
    name="tasklab.shop.process_order",
    queue="default",
    max_attempts=5,
    backoff_s=0.5,
    bind=True,
    on_give_up=gave_up,
)(_process_order)
sync_batch: JobSpec = job(
    name="tasklab.sync.sync_batch", queue=DATA_SYNC_QUEUE, max_attempts=3, bind=True
)(_sync_batch)
sync_file: JobSpec = job(
    name="tasklab.sync.sync_file", queue=DATA_SYNC_QUEUE, max_attempts=3, bind=True
)(_sync_file)
