"""SqlRunner: plain functions of a Connection run from async code, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.database import (
    SqlRunner,
    WalCheckpointer,
    make_async_engine,
    make_engine,
    one_statement,
    write_gate,
    writing,
)
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


def test_contended_writers_each_get_the_gate_alone(tmp_path: Path) -> None:
    """Waits block in a helper thread per writer: the lock must still be one writer's at a
    time, and every writer must get it."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'gate.db'}")
    inside: list[int] = []
    overlaps: list[int] = []
    done: list[int] = []

    def writer(n: int) -> None:
        for _ in range(200):
            with write_gate(engine):
                inside.append(n)
                if len(inside) > 1:
                    overlaps.append(n)
                time.sleep(0)
                inside.remove(n)
        done.append(n)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(done) == list(range(6))
    assert overlaps == []


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


_blobs = sa.Table(
    "blobs",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary),
)


def test_sqlite_connections_leave_checkpoints_to_the_checkpointer(tmp_path: Path) -> None:
    engine = make_engine(Settings(home_dir=tmp_path / ".tasklab"))
    try:
        for e in (engine, one_statement(engine)):  # the autocommit twin too
            with e.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    finally:
        engine.dispose()


def _wal_index(db: str) -> tuple[int, int]:
    """(frames in the WAL, frames already copied into the database) from the wal-index
    (https://www.sqlite.org/walformat.html): mxFrame at byte 16, nBackfill at byte 96,
    native byte order. Read without taking a lock, so it checkpoints nothing itself."""
    with open(db + "-shm", "rb") as f:
        header = f.read(100)
    (max_frame,) = struct.unpack_from("=I", header, 16)
    (backfilled,) = struct.unpack_from("=I", header, 96)
    return max_frame, backfilled


def _write_blobs(engine: sa.Engine, count: int, size: int) -> None:
    for _ in range(count):  # one transaction each: many commits, as jobs make them
        with writing(engine) as conn:
            conn.execute(_blobs.insert().values(data=os.urandom(size)))


def _wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_checkpointer_thread_copies_the_wal_into_the_database(tmp_path: Path) -> None:
    settings = Settings(home_dir=tmp_path / ".tasklab")
    engine = make_engine(settings)
    db = str(settings.sqlite_path.resolve())
    written = 200 * 20_000  # ~1,000 pages, past SQLite's own automatic checkpoint
    try:
        with writing(engine) as conn:
            _blobs.create(conn)
        with engine.connect():  # a connection stays open: no checkpoint-on-close
            _write_blobs(engine, 200, 20_000)
            # Only a checkpoint writes the database file in WAL mode, and nothing here asks
            # for one: the thread has to.
            _wait_until(lambda: os.path.getsize(db) >= written, 20, "the WAL to be copied")
            _wait_until(
                lambda: (lambda m, b: m == b)(*_wal_index(db)), 20, "every frame checkpointed"
            )
            busy, frames, checkpointed = WalCheckpointer.of(db).checkpoint()
            assert busy == 0 and frames == checkpointed
    finally:
        engine.dispose()


_FORKED_WRITER = """
import os, sys, threading, time
import sqlalchemy as sa
from tasklab.database import make_engine, writing
from tasklab.settings import Settings

blobs = sa.Table("blobs", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("data", sa.LargeBinary))
settings = Settings(home_dir=sys.argv[1])
db = str(settings.sqlite_path.resolve())
engine = make_engine(settings)
with writing(engine) as conn:
    blobs.create(conn)
parent = os.getpid()
if os.fork():
    os._exit(0)  # the parent goes, and its checkpointer thread with it
while os.getppid() == parent:
    time.sleep(0.01)
engine.dispose(close=False)  # the parent's connections are not the child's
with engine.connect():
    start = os.path.getsize(db)
    for _ in range(200):
        with writing(engine) as conn:
            conn.execute(blobs.insert().values(data=os.urandom(20_000)))
    deadline = time.monotonic() + 20
    while os.path.getsize(db) < start + 200 * 20_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    grew = os.path.getsize(db) - start
names = {t.name for t in threading.enumerate()}
print("checkpointed" if grew >= 200 * 20_000 else f"not checkpointed: {grew}", sorted(names))
"""


def test_a_forked_child_checkpoints_with_a_thread_of_its_own(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FORKED_WRITER), str(tmp_path / ".tasklab")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("checkpointed"), done.stdout + done.stderr
    assert "tasklab-wal-checkpoint" in done.stdout


def test_a_writer_waits_for_the_gate_no_longer_than_the_busy_timeout(tmp_path: Path) -> None:
    from tasklab.errors import DatabaseBusy

    settings = Settings(home_dir=tmp_path / ".tasklab", sqlite_busy_timeout_ms=300)
    engine = make_engine(settings)
    holding, release = threading.Event(), threading.Event()

    def slow_writer() -> None:  # a long job.transaction() block, say
        with write_gate(engine):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=slow_writer, daemon=True)
    thread.start()
    assert holding.wait(10)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseBusy, match="write lock"), write_gate(engine):
            pass
        waited = time.monotonic() - started
    finally:
        release.set()
        thread.join(10)
    assert 0.25 < waited < 2.0
    with write_gate(engine):  # free again once the holder let go
        pass
    engine.dispose()


def test_engines_racing_to_open_a_new_file_all_get_in(tmp_path: Path) -> None:
    """A process's engines (the API's async one, the job layer's, their twins) first connect
    to a new file at once and race to switch it to WAL; SQLite can refuse the losers with
    "database is locked" at once (no busy wait): an API's first readiness check once said
    the database was unavailable."""
    failures: list[BaseException] = []
    for trial in range(40):
        settings = Settings(home_dir=tmp_path / f"t{trial}")
        start = threading.Barrier(6)

        def connect(settings: Settings = settings, start: threading.Barrier = start) -> None:
            engine = make_engine(settings)
            start.wait()
            try:
                with engine.connect() as conn:
                    assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            except BaseException as e:  # collected, asserted below
                failures.append(e)
            finally:
                engine.dispose()

        threads = [threading.Thread(target=connect) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert failures == []


@pytest.mark.parametrize("mode, expected", [("NORMAL", 1), ("FULL", 2)])
def test_sqlite_commits_are_synced_as_configured(tmp_path: Path, mode: str, expected: int) -> None:
    engine = make_engine(Settings(home_dir=tmp_path / ".tasklab", sqlite_synchronous=mode))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected
    engine.dispose()


def test_a_fork_waits_while_a_thread_works_in_sqlite() -> None:
    """A child forked while another thread is inside SQLite inherits its mutexes locked and
    hangs at its first connect (a prefork pool process replaced under load did)."""
    from tasklab.database import fork_guard

    inside, release = threading.Event(), threading.Event()

    def background_sqlite_work() -> None:
        with fork_guard():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=background_sqlite_work, daemon=True)
    thread.start()
    assert inside.wait(10)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        with fork_guard():  # the child's guard is its own, free
            os._exit(0)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    thread.join(10)
    assert waited >= 0.25  # the fork waited for the thread to leave SQLite
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_thread_waiting_behind_another_of_its_process_gives_up_within_the_bound(
    tmp_path: Path,
) -> None:
    from tasklab.database import WriteGate
    from tasklab.errors import DatabaseBusy

    gate = WriteGate(str(tmp_path / "db.gate"), wait_s=0.3)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with gate.hold():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseBusy), gate.hold():
            pass
        assert 0.25 < time.monotonic() - started < 3
    finally:
        release.set()
        thread.join()
    with gate.hold():  # free again once the holder let go
        pass


def test_a_forked_child_takes_the_gate_once_the_parents_thread_lets_go(tmp_path: Path) -> None:
    """The child must not inherit the parent's in-process lock as held by a thread it
    does not have: it would wait for ever."""
    from tasklab.database import WriteGate

    gate = WriteGate(str(tmp_path / "db.gate"), wait_s=5)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with gate.hold():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    _register(gate)
    pid = os.fork()
    if pid == 0:  # the child: the gate once the parent's holder lets go, within its bound
        code = 1
        try:
            with gate.hold():
                code = 0
        finally:
            os._exit(code)
    time.sleep(0.3)
    release.set()
    thread.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _register(gate: Any) -> None:
    """Put ``gate`` where the fork hook finds the gates of this process."""
    from tasklab import database

    database._gates[gate.path] = gate


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["on", "off"])
def test_postgres_writes_wait_for_the_wal_flush_unless_told_not_to(
    postgres_url: str, tmp_path: Path, mode: str
) -> None:
    import asyncio

    settings = Settings(
        home_dir=tmp_path, database_url=postgres_url, postgres_synchronous_commit=mode
    )
    engine = make_engine(settings)
    try:
        for e in (engine, one_statement(engine)):  # transactions, and one-statement submits
            with e.connect() as conn:
                assert conn.execute(sa.text("SHOW synchronous_commit")).scalar_one() == mode
    finally:
        engine.dispose()

    async def shown() -> str:
        aengine = make_async_engine(settings)
        try:
            async with aengine.connect() as conn:
                return str((await conn.execute(sa.text("SHOW synchronous_commit"))).scalar_one())
        finally:
            await aengine.dispose()

    assert asyncio.run(shown()) == mode
