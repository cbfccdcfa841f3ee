"""``seed`` (idempotent, or --reset), ``check_invariants`` and the command functions."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import typer
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from tasklab.database import make_engine
from tasklab.service import commands
from tasklab.service.domain.invariants import check_invariants
from tasklab.service.domain.models import (
    LedgerEntry,
    Order,
    OrderItem,
    PointAccount,
    Product,
    SyncFile,
    User,
)
from tasklab.service.domain.seed import seed
from tasklab.settings import Settings
from tests.service.conftest import SEED, count_rows, make_settings, read_tokens


def _execute(settings: Settings, *statements: sa.Executable) -> None:
    engine = make_engine(settings)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)
    engine.dispose()


def test_seed_writes_one_token_line_per_user_with_the_admin_marked(shop_settings: Settings) -> None:
    path = shop_settings.home_dir / "tokens.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == SEED["users"] + 1
    assert [line["admin"] for line in lines].count(True) == 1
    assert all(set(line) >= {"user_id", "token"} for line in lines)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    engine = make_engine(shop_settings)
    with engine.connect() as conn:
        stored = set(conn.execute(sa.select(User.token_hash)).scalars())
    engine.dispose()
    assert not {line["token"] for line in lines} & stored  # only hashes are stored
    assert all(Path(p).is_file() for p in _paths(shop_settings))


def _paths(settings: Settings) -> list[str]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        paths = list(conn.execute(sa.select(SyncFile.path)).scalars())
    engine.dispose()
    return paths


def test_seeding_again_keeps_data_and_tokens_and_adds_only_what_is_missing(
    shop_settings: Settings,
) -> None:
    path = shop_settings.home_dir / "tokens.jsonl"
    before = path.read_text()
    _execute(
        shop_settings, sa.update(Product).where(Product.id == 1).values(stock=7, initial_stock=7)
    )
    report = seed(shop_settings, **SEED)
    assert (report.users_created, report.products_created) == (0, 0)
    assert path.read_text() == before
    assert count_rows(shop_settings, LedgerEntry) == 2 * (SEED["users"] + 1)
    assert count_rows(shop_settings, Product, Product.stock == 7) == 1

    bigger = seed(shop_settings, **{**SEED, "users": SEED["users"] + 2, "products": 8})
    assert (bigger.users_created, bigger.products_created) == (2, 2)
    assert path.read_text().startswith(before.splitlines()[0])
    assert len(read_tokens(path)) == SEED["users"] + 3
    assert check_invariants(shop_settings) == []


def test_seed_with_reset_starts_over_and_old_tokens_stop_matching(shop_settings: Settings) -> None:
    path = shop_settings.home_dir / "tokens.jsonl"
    old = read_tokens(path)
    _execute(
        shop_settings,
        sa.insert(Order).values(
            id=1,
            user_id=old[0].user_id,
            status="pending",
            reason=None,
            use_points=0,
            total_cents=0,
            created_at=0.0,
            updated_at=0.0,
        ),
    )
    seed(shop_settings, **SEED, reset=True)
    new = read_tokens(path)
    assert count_rows(shop_settings, Order) == 0
    assert count_rows(shop_settings, User) == SEED["users"] + 1
    assert {a.token for a in old}.isdisjoint({a.token for a in new})


def test_invariants_hold_after_seeding_and_each_violation_is_named(shop_settings: Settings) -> None:
    assert check_invariants(shop_settings, pending_threshold_s=0) == []
    user = read_tokens(shop_settings.home_dir / "tokens.jsonl")[0].user_id
    now = time.time()
    _execute(
        shop_settings,
        sa.update(Product).where(Product.id == 2).values(stock=90),  # 10 vanished
        sa.update(PointAccount).where(PointAccount.user_id == user).values(balance=5),
        sa.insert(Order).values(
            id=1,
            user_id=user,
            status="lost",
            reason=None,
            use_points=0,
            total_cents=0,
            created_at=now,
            updated_at=now,
        ),
        sa.insert(Order).values(
            id=2,
            user_id=user,
            status="pending",
            reason=None,
            use_points=0,
            total_cents=0,
            created_at=now - 3600,
            updated_at=now - 3600,
        ),
        sa.insert(Order).values(
            id=3,
            user_id=user,
            status="paid",
            reason=None,
            use_points=30,
            total_cents=100,
            created_at=now,
            updated_at=now,
        ),
        sa.insert(OrderItem).values(order_id=3, product_id=3, quantity=1, unit_price_cents=100),
    )
    violations = "\n".join(check_invariants(shop_settings, pending_threshold_s=60))
    assert "product 2: initial stock 100 - sold 0 = 100, but stock is 90" in violations
    assert "product 3: initial stock 100 - sold 1 = 99, but stock is 100" in violations
    assert f"user {user}: balance 5 != sum of ledger {SEED['points']}" in violations
    assert "order 1: unknown status 'lost'" in violations
    assert "order 2: pending for 3600 s" in violations
    assert "order 3 (paid, use_points 30): 0 ledger row(s)" in violations


def test_the_database_refuses_a_negative_balance(shop_settings_any_db: Settings) -> None:
    user = read_tokens(shop_settings_any_db.home_dir / "tokens.jsonl")[0].user_id
    with pytest.raises(IntegrityError, match="balance"):
        _execute(
            shop_settings_any_db,
            sa.update(PointAccount).where(PointAccount.user_id == user).values(balance=-1),
        )


@pytest.fixture
def cli() -> typer.Typer:
    """The command functions registered the way tasklab.cli registers them."""
    app = typer.Typer()
    app.command("seed")(commands.seed)
    app.command("check-invariants")(commands.check_invariants)
    db = typer.Typer()
    db.command("upgrade")(commands.db_upgrade)
    app.add_typer(db, name="db")
    return app


def test_the_commands_migrate_seed_and_check_exiting_1_on_a_violation(
    cli: typer.Typer, tmp_path: Path, redis_url: str
) -> None:
    settings = make_settings(tmp_path, redis_url)
    runner = CliRunner()
    upgraded = runner.invoke(cli, ["db", "upgrade"], obj=settings)
    assert upgraded.exit_code == 0 and "database at" in upgraded.output
    out = tmp_path / "t.jsonl"
    seeded = runner.invoke(
        cli,
        [
            "seed",
            "--users",
            "3",
            "--products",
            "2",
            "--stock",
            "5",
            "--points",
            "10",
            "--tokens-out",
            str(out),
        ],
        obj=settings,
    )
    assert seeded.exit_code == 0, seeded.output
    assert len(out.read_text().splitlines()) == 4
    assert runner.invoke(cli, ["check-invariants"], obj=settings).exit_code == 0
    _execute(settings, sa.update(Product).where(Product.id == 1).values(stock=4))
    failed = runner.invoke(cli, ["check-invariants", "--pending-threshold-s", "5"], obj=settings)
    assert failed.exit_code == 1
    assert "violation: product 1" in failed.output


def test_check_invariants_names_orders_their_settlement_job_left_unsettled(
    shop_settings_any_db: Settings,
) -> None:
    """Whatever the threshold: a pending order whose job is over or gone (nothing will settle
    it), and an order rejected with settlement_failed whose job succeeded."""
    from tasklab.database import writing
    from tasklab.jobs import JobManager
    from tasklab.jobs.records import jobs as jobs_table
    from tasklab.service.domain.jobs import process_order

    settings = shop_settings_any_db
    user = read_tokens(settings.home_dir / "tokens.jsonl")[0].user_id
    jm = JobManager(settings, local_fallback=False)
    now = time.time()
    states = {  # order id: (order status, reason, its job's status; None: no such job)
        1: ("pending", None, "QUEUED"),  # on its way: fine
        2: ("pending", None, "DEAD"),
        3: ("pending", None, "CANCELLED"),
        4: ("pending", None, "SUCCEEDED"),
        5: ("pending", None, None),
        6: ("rejected", "settlement_failed", "SUCCEEDED"),
        7: ("rejected", "settlement_failed", "DEAD"),  # what a give-up leaves: fine
        8: ("rejected", "settlement_failed", "PENDING"),  # retried, not run yet: fine
    }
    try:
        with writing(jm.engine) as conn:
            for order_id, (status, reason, job_status) in states.items():
                job = jm.prepare(process_order, order_id)
                if job_status is not None:
                    conn.execute(*job.insert)
                    conn.execute(
                        sa.update(jobs_table)
                        .where(jobs_table.c.id == job.id)
                        .values(status=job_status)
                    )
                conn.execute(
                    sa.insert(Order).values(
                        id=order_id,
                        user_id=user,
                        status=status,
                        reason=reason,
                        use_points=0,
                        total_cents=0,
                        job_id=job.id,
                        created_at=now,
                        updated_at=now,
                    )
                )
    finally:
        jm.close()

    violations = check_invariants(settings, pending_threshold_s=3600)

    assert [v.split(":")[0] for v in violations] == [f"order {i}" for i in (2, 3, 4, 5, 6)]
    assert violations[0].startswith("order 2: pending, but its job ")
    assert violations[0].endswith(" is DEAD: nothing will settle it")
    assert violations[3].endswith(" does not exist")
    assert "rejected settlement_failed, but its job " in violations[4]
