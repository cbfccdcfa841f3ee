"""The job layer's hot writes on SQLite (insert, claim, completion), on the DBAPI connection.

Every writer of every process queues for SQLite's one write lock (``tasklab.database.
WriteGate``), so what a write does while it holds the gate is what the others wait for. A
claim holds it for about 0.1 ms of SQLite work; through SQLAlchemy it held it for about 0.5 ms
(compiled-cache lookup, parameter processing, events, result wrapping). Here the statements are
the same Core statements (``tasklab.jobs.store``), compiled once; their parameters are prepared
before the gate is taken, and only sqlite3's execute and commit run under it. Their timings
still go to the SQL metrics and slow-query log.

The first few threads that write keep their pool connection (``KEPT_PER_ENGINE``): a checkout
and its return (pool events, the rollback of the reset on return) cost a submit about as
much as its INSERT. Other threads check one out per write, so the pool never runs dry.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert, UpdateBase

from tasklab.database import one_statement, write_gate
from tasklab.observe.sql import record_statement

Prepared = tuple[Executable, dict[str, Any]]
KEPT_PER_ENGINE = 4
# Connections kept by threads of a parent process, found in a forked child: never used, closed
# or returned there (SQLite handles must not cross a fork), so never garbage-collected either.
_inherited: list[Connection] = []


class _Kept:
    """A thread's pool connection, returned when the thread (or the HotWrites) is gone."""

    def __init__(self, writes: HotWrites) -> None:
        self.conn = writes.engine.connect()
        self.pid = os.getpid()
        self._writes = weakref.ref(writes)

    def __del__(self) -> None:
        if self.pid != os.getpid():  # a parent's, in a forked child
            _inherited.append(self.conn)
            return
        if sys.is_finalizing():
            return
        with contextlib.suppress(Exception):  # a connection gone bad returns to nothing
            self.conn.close()
        writes = self._writes()
        if writes is not None:
            writes._release_slot()


class RawStatement:
    """One Core statement compiled for SQLite: its SQL and its positional parameters."""

    def __init__(
        self, statement: Executable, dialect: Dialect, column_keys: list[str] | None = None
    ) -> None:
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        assert isinstance(compiled, SQLCompiler)
        self._compiled = compiled
        self._order = list(compiled.positiontup or [])
        binds = compiled.binds
        self._expanding = {name for name in self._order if binds[name].expanding}
        self._processors = {
            name: proc
            for name in self._order
            if (proc := binds[name].type.bind_processor(dialect)) is not None
        }
        self._sql: dict[tuple[int, ...], str] = {}  # by the lengths of its IN lists
        # RETURNING's columns (none without RETURNING), with their result processors (JSON)
        returned: Sequence[Any] = (
            list(statement.exported_columns) if isinstance(statement, UpdateBase) else []
        )
        self.columns: list[tuple[str, Any]] = [
            (str(col.key), col.type.result_processor(dialect, None)) for col in returned
        ]

    def bind(self, values: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
        params = self._compiled.construct_params(dict(values))
        positional: list[Any] = []
        lengths: list[int] = []
        for name in self._order:
            value = params[name]
            if name in self._expanding:
                positional.extend(value)
                lengths.append(len(value))
                continue
            proc = self._processors.get(name)
            positional.append(proc(value) if proc is not None else value)
        key = tuple(lengths)
        sql = self._sql.get(key)
        if sql is None:
            sql = self._compiled.string
            for name, n in zip((k for k in self._order if k in self._expanding), key, strict=True):
                sql = sql.replace(f"__[POSTCOMPILE_{name}]", ", ".join("?" * n))
            if len(self._sql) < 64:  # IN lists of many lengths: keep the common ones
                self._sql[key] = sql
        return sql, tuple(positional)

    def rows(self, cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
        out = []
        for raw in cursor.fetchall():
            out.append(
                {
                    key: proc(value) if proc is not None else value
                    for (key, proc), value in zip(self.columns, raw, strict=True)
                }
            )
        return out


class HotWrites:
    """Runs prepared statements of ``tasklab.jobs.store`` on a SQLite engine, under the
    write gate, in one transaction. Returns, per statement, its rows (RETURNING) or its
    rowcount."""

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name != "sqlite":
            raise ValueError("HotWrites is for SQLite engines")
        self.engine = one_statement(engine)  # autocommit: BEGIN/COMMIT are ours
        self._compiled: dict[tuple[int, tuple[str, ...]], RawStatement] = {}
        self._local = threading.local()
        self._kept_lock = threading.RLock()  # (a __del__ may run inside it)
        self._kept_count = 0
        self._slots_pid = os.getpid()

    def _kept(self) -> _Kept | None:
        """This thread's kept connection (made on its first write), or None: the others
        are taken."""
        kept: _Kept | None = getattr(self._local, "kept", None)
        if kept is not None and kept.pid == os.getpid():
            return kept
        self._local.kept = None  # (a forked child: the parent's, see _Kept.__del__)
        with self._kept_lock:
            if self._slots_pid != os.getpid():  # a forked child: no thread keeps one yet
                self._slots_pid, self._kept_count = os.getpid(), 0
            if self._kept_count >= KEPT_PER_ENGINE:
                return None
            self._kept_count += 1
        try:
            self._local.kept = kept = _Kept(self)
        except BaseException:
            self._release_slot()
            raise
        return kept

    def _release_slot(self) -> None:
        with self._kept_lock:
            if self._slots_pid == os.getpid():
                self._kept_count -= 1

    def _drop_kept(self) -> None:
        """After an error: the next write gets a fresh connection."""
        kept: _Kept | None = getattr(self._local, "kept", None)
        self._local.kept = None
        if kept is not None:
            with contextlib.suppress(Exception):
                kept.conn.invalidate()
            del kept  # __del__ returns it

    def _raw(self, statement: Executable, params: Mapping[str, Any]) -> RawStatement:
        # An INSERT's columns are its parameters' keys; other statements name their binds.
        keys = tuple(sorted(params)) if isinstance(statement, Insert) else ()
        raw = self._compiled.get((id(statement), keys))
        if raw is None:  # store's hot statements are module constants: compiled once each
            raw = RawStatement(statement, self.engine.dialect, list(keys) or None)
            self._compiled[(id(statement), keys)] = raw
        return raw

    def run(self, *prepared: Prepared) -> list[list[dict[str, Any]] | int]:
        bound = [(raw, *raw.bind(params)) for raw, params in _resolved(self, prepared)]
        kept = self._kept()
        if kept is None:
            with self.engine.connect() as conn:
                return self._run_on(conn, bound)
        try:
            return self._run_on(kept.conn, bound)
        except IntegrityError:  # the statement's fault, not the connection's
            raise
        except Exception:
            self._drop_kept()
            raise

    def _run_on(
        self, conn: Connection, bound: list[tuple[RawStatement, str, tuple[Any, ...]]]
    ) -> list[list[dict[str, Any]] | int]:
        out: list[list[dict[str, Any]] | int] = []
        timings: list[tuple[str, float]] = []
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        with write_gate(self.engine):
            many = len(bound) > 1
            if many:
                dbapi.execute("BEGIN IMMEDIATE")
            try:
                for raw, sql, params in bound:
                    started = time.perf_counter()
                    cursor = dbapi.execute(sql, params)
                    out.append(raw.rows(cursor) if raw.columns else cursor.rowcount)
                    timings.append((sql, time.perf_counter() - started))
                if many:
                    dbapi.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                if many:
                    dbapi.execute("ROLLBACK")
                raise IntegrityError(bound[len(out)][1], bound[len(out)][2], e) from e
            except BaseException:
                if many:
                    dbapi.execute("ROLLBACK")
                raise
        for sql, duration_s in timings:
            record_statement(self.engine, sql, duration_s)
        return out


def _resolved(
    writes: HotWrites, prepared: Sequence[Prepared]
) -> list[tuple[RawStatement, dict[str, Any]]]:
    return [(writes._raw(statement, params), params) for statement, params in prepared]
