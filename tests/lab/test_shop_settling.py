"""Waiting for orders to settle: as long as the backlog shrinks, and no longer once it stalls."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import sqlalchemy as sa

from tasklab.database import make_engine
from tasklab.lab.shop import wait_orders_settled
from tasklab.migrations import migrate
from tasklab.service.domain.models import Order, OrderStatus, User
from tasklab.settings import Settings


def _shop_with_pending_orders(tmp_path: Path, n: int) -> sa.Engine:
    settings = Settings(home_dir=tmp_path / ".tasklab")
    migrate(settings)
    engine = make_engine(settings)
    with engine.begin() as conn:
        conn.execute(sa.insert(User).values(id=1, name="u", token_hash="x", created_at=0.0))
        for _ in range(n):
            conn.execute(
                sa.insert(Order).values(
                    user_id=1,
                    status="pending",
                    use_points=0,
                    total_cents=1,
                    created_at=0.0,
                    updated_at=0.0,
                )
            )
    return engine


def test_a_backlog_that_keeps_shrinking_is_waited_for_past_the_stall_timeout(
    tmp_path: Path,
) -> None:
    engine = _shop_with_pending_orders(tmp_path, 4)
    stall_timeout_s, step_s = 1.5, 0.5  # the whole backlog takes 2 s: longer than the timeout

    def settle_one_by_one() -> None:
        for _ in range(4):
            time.sleep(step_s)
            with engine.begin() as conn:
                first = conn.execute(
                    sa.select(sa.func.min(Order.id)).where(Order.status == "pending")
                ).scalar_one()
                conn.execute(
                    sa.update(Order).where(Order.id == first).values(status=OrderStatus.PAID.value)
                )

    worker = threading.Thread(target=settle_one_by_one)
    worker.start()
    assert wait_orders_settled(engine, timeout_s=stall_timeout_s) == 0
    worker.join()
    engine.dispose()


def test_a_stalled_backlog_is_given_up_after_the_timeout(tmp_path: Path) -> None:
    engine = _shop_with_pending_orders(tmp_path, 3)
    started = time.monotonic()
    assert wait_orders_settled(engine, timeout_s=0.5) == 3
    assert time.monotonic() - started < 10
    engine.dispose()
