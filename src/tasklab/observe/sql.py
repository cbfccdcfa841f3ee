"""SQL timing: every statement into a histogram by operation; slow ones counted and logged.

``instrument(engine, slow_query_ms=settings.slow_query_ms)`` attaches SQLAlchemy cursor events
to a sync engine, or to an ``AsyncEngine``'s ``sync_engine``. Bound parameters are never logged,
and literals written into the SQL text are replaced by ``?`` before a statement is logged or
kept, so a slow-query line cannot leak a value.

The process also keeps a small in-memory view for ``/api/v1/metrics/database``: query count,
average and maximum time, and a bounded ring of recent slow queries (``QUERY_STATS``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from time import perf_counter
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from tasklab.observe.metrics import SQL_DURATION, SQL_SLOW_QUERIES

OPERATIONS = ("select", "insert", "update", "delete")
MAX_STATEMENT_CHARS = 2000
RECENT_SLOW_QUERIES = 50
_START_KEY = "tasklab_query_start"
_LEADING_COMMENTS = re.compile(r"^\s*(?:--[^\n]*(?:\n|$)\s*|/\*.*?\*/\s*)*", re.DOTALL)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
_WRITE_WORD = re.compile(r"\b(insert|update|delete)\b", re.IGNORECASE)
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'")
_NUMBER_LITERAL = re.compile(r"(?<![\w.$:])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_WHITESPACE = re.compile(r"\s+")

log = logging.getLogger(__name__)


def operation_of(statement: str) -> str:
    """select/insert/update/delete, or "other" (DDL, PRAGMA, BEGIN, ...)."""
    body = _LEADING_COMMENTS.sub("", statement, count=1)
    match = _FIRST_WORD.match(body)
    word = match.group(0).lower() if match else ""
    if word == "with":  # a CTE: the statement writes if any write keyword follows
        write = _WRITE_WORD.search(body)
        return write.group(1).lower() if write else "select"
    return word if word in OPERATIONS else "other"


def redact(statement: str) -> str:
    """The statement with literals replaced by ``?``, whitespace collapsed, length bounded."""
    text = _STRING_LITERAL.sub("?", statement)
    text = _NUMBER_LITERAL.sub("?", text)
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > MAX_STATEMENT_CHARS:
        text = text[:MAX_STATEMENT_CHARS] + "..."
    return text


@dataclass(frozen=True)
class SlowQuery:
    at: float  # epoch seconds
    duration_ms: float
    operation: str
    statement: str  # redacted


class QueryStats:
    """Count, total, max and the most recent slow queries of this process (thread-safe)."""

    def __init__(self, max_recent: int = RECENT_SLOW_QUERIES) -> None:
        self._lock = threading.Lock()
        self._recent: deque[SlowQuery] = deque(maxlen=max_recent)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.count = 0
            self.slow_count = 0
            self.total_s = 0.0
            self.max_s = 0.0
            self._recent.clear()

    def record(self, duration_s: float, slow: SlowQuery | None = None) -> None:
        with self._lock:
            self.count += 1
            self.total_s += duration_s
            self.max_s = max(self.max_s, duration_s)
            if slow is not None:
                self.slow_count += 1
                self._recent.append(slow)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            avg_ms = self.total_s / self.count * 1000 if self.count else 0.0
            return {
                "query_count": self.count,
                "avg_ms": round(avg_ms, 3),
                "max_ms": round(self.max_s * 1000, 3),
                "slow_query_count": self.slow_count,
                "recent_slow_queries": [asdict(q) for q in reversed(self._recent)],
            }


QUERY_STATS = QueryStats()


@dataclass
class _Recorder:
    slow_query_ms: float
    stats: QueryStats

    def record(self, statement: str, duration_s: float) -> None:
        operation = operation_of(statement)
        SQL_DURATION.labels(operation).observe(duration_s)
        duration_ms = duration_s * 1000
        if duration_ms <= self.slow_query_ms:
            self.stats.record(duration_s)
            return
        SQL_SLOW_QUERIES.labels(operation).inc()
        slow = SlowQuery(
            at=time.time(),
            duration_ms=round(duration_ms, 3),
            operation=operation,
            statement=redact(statement),
        )
        self.stats.record(duration_s, slow)
        log.warning(
            "slow query: %.1f ms > %.0f ms (%s): %s",
            duration_ms,
            self.slow_query_ms,
            operation,
            slow.statement,
            extra={"duration_ms": slow.duration_ms, "operation": operation},
        )


_RECORDERS: weakref.WeakKeyDictionary[Engine, _Recorder] = weakref.WeakKeyDictionary()


def instrument(
    engine: Engine | AsyncEngine, *, slow_query_ms: float = 100.0, stats: QueryStats | None = None
) -> QueryStats:
    """Time every statement on ``engine``; calling it again only updates the threshold."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    recorder = _RECORDERS.get(sync_engine)
    if recorder is not None:
        recorder.slow_query_ms = slow_query_ms
        if stats is not None:
            recorder.stats = stats
        return recorder.stats
    _RECORDERS[sync_engine] = _Recorder(slow_query_ms, stats or QUERY_STATS)
    event.listen(sync_engine, "before_cursor_execute", _before_cursor_execute)
    event.listen(sync_engine, "after_cursor_execute", _after_cursor_execute)
    event.listen(sync_engine, "handle_error", _handle_error)
    return _RECORDERS[sync_engine].stats


def _before_cursor_execute(
    conn: Connection,
    _cursor: Any,
    _statement: str,
    _parameters: Any,
    _context: Any,
    _executemany: bool,
) -> None:
    conn.info.setdefault(_START_KEY, []).append(perf_counter())


def _after_cursor_execute(
    conn: Connection,
    _cursor: Any,
    statement: str,
    _parameters: Any,
    _context: Any,
    _executemany: bool,
) -> None:
    starts = conn.info.get(_START_KEY)
    recorder = _RECORDERS.get(conn.engine)
    if not starts or recorder is None:
        return
    recorder.record(statement, perf_counter() - starts.pop())


def _handle_error(context: ExceptionContext) -> None:
    conn = context.connection
    if conn is not None and conn.info.get(_START_KEY):
        conn.info[_START_KEY].pop()


def record_statement(engine: Engine, statement: str, duration_s: float) -> None:
    """Time a statement run outside SQLAlchemy's execution (on the DBAPI connection) on an
    instrumented engine, as the event hooks would."""
    recorder = _RECORDERS.get(engine)
    if recorder is not None:
        recorder.record(statement, duration_s)
