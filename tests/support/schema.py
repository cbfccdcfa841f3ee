"""Fresh migrated databases for fixtures, without running every migration for every test.

Running the migrations costs a test a quarter to half a second (one DDL statement after
another, each committed). ``migrated(settings)`` gives the same schema at the head revision,
with no rows: on SQLite a copy of a file this process migrated once; on PostgreSQL the tables
of a schema left at the head revision emptied (TRUNCATE), else the schema dropped and migrated.
The migrations themselves are tested through ``tasklab.migrations.migrate`` (test_database.py,
tests/service/test_schema_and_readiness.py).
"""

from __future__ import annotations

import atexit
import shutil
import sqlite3
import tempfile
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic.script import ScriptDirectory

from tasklab.database import make_engine
from tasklab.migrations import alembic_config, migrate
from tasklab.settings import Settings

# What a schema at the head revision holds on PostgreSQL, once this process has migrated one:
# (tables, indexes). A schema that differs (another test dropped, altered or added to it) is
# dropped and migrated again.
_postgres_shape: tuple[frozenset[str], frozenset[str]] | None = None


def migrated(settings: Settings) -> Settings:
    """``settings``' database at the head revision with no rows; ``settings`` back."""
    if settings.database_url is None:
        _sqlite(settings)
    else:
        _postgres(settings)
    return settings


def _sqlite(settings: Settings) -> None:
    target = settings.sqlite_path
    if target.exists():  # not a fresh file: migrate it as it is
        migrate(settings)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_sqlite_template(), target)


@cache
def _sqlite_template() -> Path:
    home = Path(tempfile.mkdtemp(prefix="tasklab-schema-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    settings = Settings(home_dir=home)
    migrate(settings)
    # everything in the file itself (WAL mode is kept in its header): one file to copy
    with sqlite3.connect(settings.sqlite_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return settings.sqlite_path


@cache
def _head() -> str | None:
    return ScriptDirectory.from_config(alembic_config(Settings())).get_current_head()


def _postgres(settings: Settings) -> None:
    global _postgres_shape
    engine = make_engine(settings)
    try:
        with engine.begin() as conn:
            shape = _shape(conn)
            if shape == _postgres_shape and _version(conn) == _head():
                tables = ", ".join(f'"{t}"' for t in sorted(shape[0] - {"alembic_version"}))
                conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
                return
            conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
        migrate(settings)
        with engine.connect() as conn:
            _postgres_shape = _shape(conn)
    finally:
        engine.dispose()


def _shape(conn: sa.Connection) -> tuple[frozenset[str], frozenset[str]]:
    tables = conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    indexes = conn.execute(sa.text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"))
    return frozenset(tables.scalars()), frozenset(indexes.scalars())


def _version(conn: sa.Connection) -> str | None:
    if not conn.execute(sa.text("SELECT to_regclass('public.alembic_version')")).scalar():
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
