"""SQL engines from settings: SQLite (WAL, busy timeout) by default, PostgreSQL in production."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasklab.errors import DatabaseBusy
from tasklab.observe.sql import instrument
from tasklab.settings import Settings

T = TypeVar("T")
POOL_RECYCLE_S = 1800
# A server that vanished (host down, packets dropped) is found by the kernel: a connect gives
# up after 10 s, an idle connection after 10 + 3 x 5 s of unanswered keepalives, one with
# unacknowledged writes after 30 s. A proxy that still acknowledges is tasklab.links' job.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
GATE_SUFFIX = "-writer.lock"


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_pragmas(settings: Settings, database: str | None) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL lets readers proceed while one writer commits; busy_timeout makes concurrent
        # writers wait for the lock instead of failing with "database is locked".
        _enter_wal(cur, settings.sqlite_busy_timeout_ms / 1000)
        cur.execute(f"PRAGMA busy_timeout={settings.sqlite_busy_timeout_ms}")
        # NORMAL: a commit survives the process crashing, not the machine losing power
        # (the last commits before it may be lost); FULL syncs the WAL at every commit.
        cur.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        if database:
            # Checkpoints run in a thread of their own (WalCheckpointer), not inside the
            # commit that crosses the threshold while it holds the write gate.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            WalCheckpointer.of(database).ensure()
        cur.close()

    return on_connect


def _enter_wal(cur: Any, wait_s: float) -> None:
    """Switch the file to WAL (persistent, so once per file). Connections racing to switch a
    new file can get "database is locked" at once, without the busy handler: retry them."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode")
            if str(cur.fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as e:  # sqlite3's or the async adapter's OperationalError
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _file_of(url: str) -> str | None:
    """The database file of a SQLite URL; None for an in-memory database."""
    database = make_url(url).database
    return os.path.abspath(database) if database and database != ":memory:" else None


# A thread that calls into SQLite from a process that forks holds this, and a fork waits for
# it: a child forked while another thread was inside SQLite inherits SQLite's process-wide
# mutexes locked and hangs at its first connect. Celery's prefork pool forks a new pool
# process (after max_tasks_per_child, or a crash) from the worker's main process, where the
# reaper and the WAL checkpointer run.
_fork_lock = threading.RLock()


def fork_guard() -> contextlib.AbstractContextManager[Any]:
    """Hold around SQLite work done by a background thread (see ``_fork_lock``)."""
    return _fork_lock


def _fork_lock_in_child() -> None:
    global _fork_lock
    _fork_lock = threading.RLock()  # the child's only thread is the one that forked
    for gate in _gates.values():  # a lock held by a parent's thread would be held for ever
        gate._in_process = threading.Lock()


os.register_at_fork(
    before=lambda: _fork_lock.acquire(),
    after_in_parent=lambda: _fork_lock.release(),
    after_in_child=_fork_lock_in_child,
)


class WalCheckpointer:
    """Copies a SQLite WAL back into the database file from a daemon thread, one per file
    and process, every ``interval_s``.

    SQLite's automatic checkpoint runs inside the commit that crosses 1,000 WAL pages: that
    writer (and every writer queued behind it at the write gate) waits several milliseconds,
    about once per few hundred commits, which was most of a submit's P99. A PASSIVE
    checkpoint here waits for no one; SQLite restarts the WAL from its start once a
    checkpoint has copied every frame, so it stays a few megabytes. Checkpointing from
    several processes at once is safe (one runs, the others find it busy and skip).
    """

    interval_s = 0.2
    _all: dict[str, WalCheckpointer] = {}
    _all_lock = threading.Lock()

    def __init__(self, database: str) -> None:
        self.database = database
        self._pid = 0

    @classmethod
    def of(cls, database: str) -> WalCheckpointer:
        with cls._all_lock:
            found = cls._all.get(database)
            if found is None:
                found = cls._all[database] = cls(database)
            return found

    def ensure(self) -> None:
        """Start the thread in this process if it is not running (first use, or a fork)."""
        if self._pid == os.getpid():
            return
        with self._all_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="tasklab-wal-checkpoint", daemon=True).start()

    def checkpoint(self) -> tuple[int, int, int]:
        """One PASSIVE checkpoint: (busy, frames in the WAL, frames checkpointed). Raises
        sqlite3.Error if the database file does not exist (it is never created here)."""
        with fork_guard():
            conn = sqlite3.connect(f"file:{self.database}?mode=rw", uri=True, timeout=0)
            try:
                busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                return int(busy), int(frames), int(done)
            finally:
                conn.close()

    def _run(self) -> None:
        pid = os.getpid()
        wal = self.database + "-wal"
        seen = None
        while self._pid == pid:
            time.sleep(self.interval_s)
            try:
                changed = os.stat(wal).st_mtime_ns
            except FileNotFoundError:  # no WAL yet, or the database is closed everywhere
                if not os.path.exists(self.database):
                    break  # the database is gone (a test's temporary file): so is the work
                continue
            if changed == seen:  # no commit since the last checkpoint: nothing to copy
                continue
            try:
                self.checkpoint()
                seen = changed
            except sqlite3.Error:  # locked: next time
                continue
        with self._all_lock:
            if self._pid == pid:
                self._pid = 0  # a later connection starts the thread again


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    url = settings.sync_database_url
    if _is_sqlite(url):
        settings.home_dir.mkdir(parents=True, exist_ok=True)
        engine = _sqlite_engine(settings, url, **kwargs)
        # The twin that one_statement() hands out: its own pool, always in autocommit (an
        # execution option would switch each connection's mode at checkout and back at
        # checkin: one more statement per write).
        twin = _sqlite_engine(settings, url, isolation_level="AUTOCOMMIT", **kwargs)
        _autocommit_twins[engine] = twin
        instrument(twin, slow_query_ms=settings.slow_query_ms)
    else:
        engine = _server_engine(settings, url, pool_pre_ping=True, **kwargs)
        # One-statement writes (a job's insert, claim, completion) in autocommit: one round
        # trip each instead of BEGIN, statement, COMMIT and a ping; their own pools, so no
        # connection switches mode at checkout. A connection the server dropped fails one
        # statement (the pool then reconnects): the job layer recovers that like a lost worker.
        twin = _server_engine(settings, url, isolation_level="AUTOCOMMIT", **kwargs)
        _autocommit_twins[engine] = twin
        relaxed = _server_engine(settings, url, isolation_level="AUTOCOMMIT", **kwargs)
        event.listen(relaxed, "connect", _no_wal_wait)
        _relaxed_twins[engine] = relaxed
        for e in (twin, relaxed):
            instrument(e, slow_query_ms=settings.slow_query_ms)
        if settings.postgres_synchronous_commit == "off":  # every write, submits included
            for e in (engine, twin):
                event.listen(e, "connect", _no_wal_wait)
    instrument(engine, slow_query_ms=settings.slow_query_ms)
    return engine


def _server_engine(
    settings: Settings, url: str, *, pool_pre_ping: bool = False, **kwargs: Any
) -> Engine:
    return create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_pre_ping=pool_pre_ping,
        pool_recycle=POOL_RECYCLE_S,
        connect_args={**POSTGRES_CONNECT_ARGS, **kwargs.pop("connect_args", {})},
        **kwargs,
    )


def _no_wal_wait(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET synchronous_commit TO off")
    cur.close()


def _sqlite_engine(settings: Settings, url: str, **kwargs: Any) -> Engine:
    engine = create_engine(
        url,
        connect_args={
            "timeout": settings.sqlite_busy_timeout_ms / 1000,
            "check_same_thread": False,
        },
        **kwargs,
    )
    event.listen(engine, "connect", _sqlite_pragmas(settings, _file_of(url)))
    _gate_wait_s[engine] = settings.sqlite_busy_timeout_ms / 1000
    return engine


_gate_wait_s: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()
_autocommit_twins: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_relaxed_twins: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def make_async_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    url = settings.async_database_url
    if _is_sqlite(url):
        settings.home_dir.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, connect_args={"timeout": settings.sqlite_busy_timeout_ms / 1000}, **kwargs
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(settings, _file_of(url)))
    else:
        engine = create_async_engine(
            url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_s,
            # No ping per checkout: it doubled the cost of a one-SELECT request. A connection
            # the server dropped fails one request with a 503 + Retry-After (the pool is then
            # invalidated and reconnects); recycling keeps idle ones from going stale.
            pool_pre_ping=False,
            pool_recycle=POOL_RECYCLE_S,
            **kwargs,
        )
        if settings.postgres_synchronous_commit == "off":
            event.listen(engine.sync_engine, "connect", _no_wal_wait)
    instrument(engine.sync_engine, slow_query_ms=settings.slow_query_ms)
    return engine


class SqlRunner:
    """Runs a plain function of a SQLAlchemy ``Connection`` from async code, the cheapest way
    for the database at hand:

    - SQLite: aiosqlite hands every statement to a thread and back (~0.6 ms of CPU per
      query here, ten times the query itself). Reads run inline on the event loop instead
      (in WAL mode a reader never waits for a writer; a point read takes ~50 µs); a write
      transaction runs in one worker thread, because it may wait for the write lock.
    - PostgreSQL: the asyncpg engine runs the function through ``run_sync`` (no thread).

    Reads use ``reader`` when given: on PostgreSQL an autocommit view of the pool, which
    saves the BEGIN/ROLLBACK around a single SELECT.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        sync_engine: Engine | None = None,
        reader: AsyncEngine | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        """``max_concurrent``: statements in flight at once (on PostgreSQL, the pool size).
        More callers queue here: beyond the pool, SQLAlchemy would open and close an overflow
        connection per request (a PostgreSQL backend started each time)."""
        self.engine = engine
        self.reader = reader or engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self.sync_engine = sync_engine if self.is_sqlite else None
        self._slots = (
            asyncio.Semaphore(max_concurrent)
            if max_concurrent and not self.is_sqlite
            else contextlib.nullcontext()
        )

    async def read(self, fn: Callable[[Connection], T]) -> T:
        if self.sync_engine is not None:
            with self.sync_engine.connect() as conn:
                return fn(conn)
        async with self._slots, self.reader.connect() as aconn:
            return await aconn.run_sync(fn)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """``fn`` inside one transaction: committed if it returns, rolled back if it raises."""
        if self.sync_engine is not None:
            return await asyncio.to_thread(self._write_sync, self.sync_engine, fn)
        async with self._slots, self.engine.begin() as aconn:
            return await aconn.run_sync(fn)

    @staticmethod
    def _write_sync(engine: Engine, fn: Callable[[Connection], T]) -> T:
        with writing(engine) as conn:
            return fn(conn)


def one_statement(engine: Engine) -> Engine:
    """``engine`` for transactions of a single statement (a job insert, claim, completion).

    On SQLite it runs them in autocommit mode: the statement is its own transaction inside
    ``sqlite3_step``, so the write lock is never held while Python runs between BEGIN and
    COMMIT, where a preempted process would make every other writer sleep out SQLite's busy
    handler (1, 2, 5 ms ...). Other databases: the engine itself.
    """
    twin = _autocommit_twins.get(engine)
    if twin is not None:
        return twin
    if engine.dialect.name == "sqlite":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def dispose_all(engine: Engine, *, close: bool = True) -> None:
    """Dispose of ``engine`` and of the twins ``make_engine`` made with it."""
    for e in {engine, _autocommit_twins.get(engine), _relaxed_twins.get(engine)}:
        if e is not None:
            e.dispose(close=close)


def relaxed_writes(engine: Engine) -> Engine:
    """``one_statement(engine)`` for writes whose loss in a database crash is harmless: on
    PostgreSQL they commit without waiting for their WAL to be flushed (``synchronous_commit
    off``; the WAL writer flushes within ``wal_writer_delay``, 200 ms by default). A claim, a
    lease renewal, the relay's QUEUED mark, or a completion without ``job.transaction()``
    lost that way leaves the job to run again: execution is at least once anyway. Inserts,
    transactions' effects and dead letters are never written this way."""
    twin = _relaxed_twins.get(engine)
    return twin if twin is not None else one_statement(engine)


class WriteGate:
    """One write transaction at a time across every process that uses a SQLite file, queued
    by the kernel (``flock`` on a side file) instead of by SQLite's busy handler.

    SQLite makes a writer that finds the database locked sleep and retry (1, 2, 5, 10 ... 100
    ms): under contention most of a writer's latency is those sleeps, and the unlucky ones
    wait hundreds of milliseconds while the lock is free. A blocked ``flock`` wakes as soon as
    the holder lets go. Reentrant per thread; each thread (and each forked process) has its
    own descriptor, because ``flock`` locks belong to the open file, not to the thread.

    A wait is bounded by ``wait_s`` (the busy timeout): a writer that holds the lock for
    longer (a long ``job.transaction()`` block, a process stopped mid-write) makes the others
    fail with ``DatabaseBusy`` instead of stalling them for ever. ``flock`` has no timeout,
    so a contended wait blocks in a helper thread (``_Waiter``) while the writer waits for it
    with one: the kernel still wakes it the moment the lock is free (polling instead cost a
    third of a worker's CPU under load, and let the lock sit free between polls).
    """

    def __init__(self, path: str, wait_s: float = 10.0) -> None:
        self.path = path
        self.wait_s = wait_s
        self._local = threading.local()
        # The threads of one process queue here first, so that only one of them at a time
        # waits for the flock: a wait behind a thread of one's own is a futex, not a helper
        # thread's hand-off (a submit behind its relay, a claim behind the lease keeper).
        self._in_process = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        handle = self._handle()
        if handle.depth:
            handle.depth += 1
            try:
                yield
            finally:
                handle.depth -= 1
            return
        started = time.monotonic()
        if not self._in_process.acquire(timeout=self.wait_s):
            self._busy()
        try:
            self._acquire(handle, self.wait_s - (time.monotonic() - started))
            handle.depth = 1
            try:
                yield
            finally:
                handle.depth = 0
                fcntl.flock(handle.fd, fcntl.LOCK_UN)
        finally:
            self._in_process.release()

    def _acquire(self, handle: _GateHandle, wait_s: float) -> None:
        if not handle.acquire(max(0.0, wait_s)):
            self._busy()

    def _busy(self) -> None:
        raise DatabaseBusy(
            f"waited {self.wait_s:g} s for the SQLite write lock of "
            f"{self.path.removesuffix(GATE_SUFFIX)}: another writer holds it "
            "(a long job.transaction() block, or a stopped process); keep "
            "transactions short, or raise sqlite_busy_timeout_ms"
        )

    def _handle(self) -> _GateHandle:
        handle: _GateHandle | None = getattr(self._local, "handle", None)
        if handle is None or handle.pid != os.getpid():
            handle = _GateHandle(self.path)
            self._local.handle = handle
            # A process that forked with its connections open made no new one: its writes
            # still need checkpoints.
            WalCheckpointer.of(self.path.removesuffix(GATE_SUFFIX)).ensure()
        return handle


def _open_gate(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class _GateHandle:
    """A thread's descriptor of the gate file; closed when the thread (its local) goes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.fd = _open_gate(path)
        self.depth = 0
        self._waiter: _Waiter | None = None

    def acquire(self, wait_s: float) -> bool:
        """Take the lock within ``wait_s``; False if another writer held it all along."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        while True:
            if self._waiter is None:
                self._waiter = _Waiter(self.fd)
            got = self._waiter.wait(wait_s)
            if got is not None:
                break
            self._waiter = None  # it had ended (idle too long): start another
        if not got:  # the waiter keeps the old descriptor until it gets the lock, then closes it
            self._waiter = None
            self.fd = _open_gate(self.path)
        return got

    def __del__(self) -> None:
        if self.pid == os.getpid():
            if self._waiter is not None:
                self._waiter.stop()
            with contextlib.suppress(OSError):
                os.close(self.fd)


class _Waiter:
    """A thread that blocks in ``flock`` for a handle's descriptor on request. The lock
    belongs to the descriptor, so once it has it the requesting thread holds it."""

    IDLE_S = 60.0  # an idle waiter ends (a new one starts on the next contended write)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._cond = threading.Condition()
        self._state = "idle"  # -> wanted -> held -> idle; or abandoned, stopped, gone
        threading.Thread(target=self._run, name="tasklab-write-gate", daemon=True).start()

    def wait(self, timeout_s: float) -> bool | None:
        """True: the lock is held; False: not within ``timeout_s``; None: the waiter ended."""
        with self._cond:
            if self._state == "gone":
                return None
            self._state = "wanted"
            self._cond.notify_all()
            if self._cond.wait_for(lambda: self._state == "held", timeout_s):
                self._state = "idle"
                return True
            self._state = "abandoned"  # it will unlock and close the descriptor itself
            return False

    def stop(self) -> None:
        with self._cond:
            if self._state == "idle":
                self._state = "stopped"
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(
                    lambda: self._state in ("wanted", "stopped"), self.IDLE_S
                ):
                    self._state = "gone"
                    return
                if self._state == "stopped":
                    return
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            with self._cond:
                if self._state == "abandoned":
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    os.close(self.fd)
                    return
                self._state = "held"
                self._cond.notify_all()


_gates: dict[str, WriteGate] = {}  # by lock file: one per database file and process
_gate_of: weakref.WeakKeyDictionary[Engine, WriteGate | None] = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def write_gate(engine: Engine) -> contextlib.AbstractContextManager[None]:
    """Hold this while a write transaction on ``engine`` is open (see ``WriteGate``); a
    no-op for servers, which queue writers themselves."""
    try:
        gate = _gate_of[engine]
    except KeyError:
        gate = _gate_of[engine] = _gate_for(engine)
    return gate.hold() if gate is not None else contextlib.nullcontext()


def _gate_for(engine: Engine) -> WriteGate | None:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    path = os.path.abspath(database) + GATE_SUFFIX
    with _gates_lock:
        gate = _gates.get(path)
        if gate is None:
            gate = _gates[path] = WriteGate(path)
        if (wait_s := _gate_wait_s.get(engine)) is not None:
            gate.wait_s = wait_s
    return gate


@contextlib.contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()`` for a transaction that writes: committed if the block returns,
    rolled back if it raises, and queued behind other writers on SQLite (``WriteGate``)."""
    # The connection is checked out before the gate and returned after it: the pool's
    # bookkeeping (and its reset on return) need not hold up the other writers.
    with engine.connect() as conn, write_gate(engine), conn.begin():
        yield conn
