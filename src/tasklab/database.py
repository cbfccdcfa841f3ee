"""SQL engines from settings: SQLite (WAL, busy timeout) by default, PostgreSQL in production."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tasklab.observe.sql import instrument
from tasklab.settings import Settings


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
            pool_pre_ping=True,
            **kwargs,
        )
    instrument(engine.sync_engine, slow_query_ms=settings.slow_query_ms)
    return engine
