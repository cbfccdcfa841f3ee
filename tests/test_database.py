"""SqlRunner: plain functions of a Connection run from async code, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.database import SqlRunner, make_async_engine, make_engine, write_gate
from tasklab.settings import Settings

_things = sa.Table(
    "things",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text),
)


@pytest.fixture
async def runner(tmp_path: Path, database_url: str | None) -> AsyncIterator[SqlRunner]:
    settings = Settings(home_dir=tmp_path / ".tasklab", database_url=database_url)
    sync_engine = make_engine(settings)
    with sync_engine.begin() as conn:
        _things.create(conn)
    async_engine = make_async_engine(settings)
    yield SqlRunner(async_engine, sync_engine=sync_engine)
    await async_engine.dispose()
    sync_engine.dispose()


def _names(conn: Connection) -> list[str]:
    return list(conn.execute(sa.select(_things.c.name).order_by(_things.c.id)).scalars())


async def test_a_write_commits_when_it_returns_and_a_read_sees_it(runner: SqlRunner) -> None:
    def add(conn: Connection) -> int:
        conn.execute(_things.insert().values(name="a"))
        conn.execute(_things.insert().values(name="b"))
        return 2

    assert await runner.write(add) == 2
    assert await runner.read(_names) == ["a", "b"]


async def test_a_write_that_raises_leaves_nothing_behind(runner: SqlRunner) -> None:
    def half_then_fail(conn: Connection) -> None:
        conn.execute(_things.insert().values(name="half"))
        raise ValueError("refused after the first insert")

    with pytest.raises(ValueError, match="refused"):
        await runner.write(half_then_fail)
    assert await runner.read(_names) == []


async def test_on_sqlite_reads_stay_on_the_loop_thread_and_writes_leave_it(
    tmp_path: Path,
) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab")
    sync_engine = make_engine(settings)
    with sync_engine.begin() as conn:
        _things.create(conn)
    async_engine = make_async_engine(settings)
    runner = SqlRunner(async_engine, sync_engine=sync_engine)
    loop_thread = threading.get_ident()
    try:
        read_on = await runner.read(lambda _conn: threading.get_ident())
        write_on = await runner.write(lambda _conn: threading.get_ident())
    finally:
        await async_engine.dispose()
        sync_engine.dispose()
    assert runner.is_sqlite
    assert read_on == loop_thread  # no hand-off to a thread for a read
    assert write_on != loop_thread  # a write may wait on the busy timeout: never on the loop


def _hold_gate(db: str, holding: Any, release: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{db}")
    with write_gate(engine):
        holding.set()
        release.wait(30)


def test_the_write_gate_makes_writers_of_other_processes_wait_for_the_holder(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "gate.db")
    ctx = multiprocessing.get_context("spawn")
    holding, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_gate, args=(db, holding, release))
    holder.start()
    try:
        assert holding.wait(30)
        entered = threading.Event()

        def writer() -> None:
            with write_gate(sa.create_engine(f"sqlite:///{db}")):
                entered.set()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        assert not entered.wait(0.3)  # blocked while the other process holds it
        release.set()
        assert entered.wait(30)  # and let in once it lets go
    finally:
        release.set()
        holder.join(30)


def test_the_write_gate_is_reentrant_within_a_thread(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'gate.db'}")
    with write_gate(engine), write_gate(engine):
        pass
    with write_gate(engine):  # released by the outer exit: taken again at once
        pass


def test_the_write_gate_is_a_no_op_for_servers() -> None:
    engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    gate = write_gate(engine)
    assert isinstance(gate, contextlib.nullcontext)
