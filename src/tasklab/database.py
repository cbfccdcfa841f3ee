"""SQL engines from settings: SQLite (WAL, busy timeout) by default, PostgreSQL in production."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasklab.observe.sql import instrument
from tasklab.settings import Settings

T = TypeVar("T")
POOL_RECYCLE_S = 1800


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_pragmas(settings: Settings) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL lets readers proceed while one writer commits; busy_timeout makes concurrent
        # writers wait for the lock instead of failing with "database is locked".
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={settings.sqlite_busy_timeout_ms}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    url = settings.sync_database_url
    if _is_sqlite(url):
        settings.home_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={
                "timeout": settings.sqlite_busy_timeout_ms / 1000,
                "check_same_thread": False,
            },
            **kwargs,
        )
        event.listen(engine, "connect", _sqlite_pragmas(settings))
    else:
        engine = create_engine(
            url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_s,
            pool_pre_ping=True,
            **kwargs,
        )
    instrument(engine, slow_query_ms=settings.slow_query_ms)
    return engine


def make_async_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    url = settings.async_database_url
    if _is_sqlite(url):
        settings.home_dir.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, connect_args={"timeout": settings.sqlite_busy_timeout_ms / 1000}, **kwargs
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(settings))
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
    instrument(engine.sync_engine, slow_query_ms=settings.slow_query_ms)
    return engine


class SqlRunner:
    """Runs a plain function of a SQLAlchemy ``Connection`` from async code, the cheapest way
    for the database at hand:

    - SQLite: aiosqlite hands every statement to a thread and back (~0.6 ms of CPU per
      query here, ten times the query itself). Reads run inline on the event loop instead
      (in WAL mode a reader never waits for a writer; a point read takes ~50 µs); a write
      transaction runs in one worker thread, because it may wait out the busy timeout.
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
        with engine.begin() as conn:
            return fn(conn)


def one_statement(engine: Engine) -> Engine:
    """``engine`` for transactions of a single statement (a job insert, claim, completion).

    On SQLite it runs them in autocommit mode: the statement is its own transaction inside
    ``sqlite3_step``, so the write lock is never held while Python runs between BEGIN and
    COMMIT, where a preempted process would make every other writer sleep out SQLite's busy
    handler (1, 2, 5 ms ...). Other databases: the engine itself.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine
