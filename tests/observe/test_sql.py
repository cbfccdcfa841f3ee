"""SQL timing: histogram by operation, slow-query counter, WARNING log with nothing secret."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, create_engine, event, text

from tasklab.observe.sql import QueryStats, instrument, operation_of, redact

SECRET = "4111-1111-1111-1111"


def pause_ms(ms: int) -> int:
    """A SQL function whose cost is known: it blocks for ``ms`` milliseconds."""
    time.sleep(ms / 1000)
    return ms


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")

    @event.listens_for(engine, "connect")
    def add_pause(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.create_function("pause_ms", 1, pause_ms)

    with engine.begin() as conn:  # connect (and let the dialect initialise) before measuring
        conn.execute(text("CREATE TABLE cards (number TEXT)"))
    yield engine
    engine.dispose()


def slow_count(operation: str) -> float:
    return (
        REGISTRY.get_sample_value("tasklab_sql_slow_queries_total", {"operation": operation}) or 0.0
    )


def duration_count(operation: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "tasklab_sql_query_duration_seconds_count", {"operation": operation}
        )
        or 0.0
    )


def test_a_query_slower_than_the_threshold_is_logged_with_its_parameters_redacted(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    stats = instrument(engine, slow_query_ms=20, stats=QueryStats())
    before = slow_count("select")
    caplog.set_level(logging.WARNING, logger="tasklab.observe.sql")

    with engine.connect() as conn:
        conn.execute(
            text("SELECT pause_ms(:ms), :card, 'inline-secret' WHERE 42 = 42"),
            {"ms": 40, "card": SECRET},
        )

    assert slow_count("select") == before + 1
    [record] = [r for r in caplog.records if r.name == "tasklab.observe.sql"]
    assert record.levelno == logging.WARNING
    statement = record.getMessage().split("(select): ", 1)[1]
    assert statement == "SELECT pause_ms(?), ?, ? WHERE ? = ?"
    assert SECRET not in caplog.text
    assert "inline-secret" not in caplog.text
    [slow] = stats.snapshot()["recent_slow_queries"]
    assert slow["operation"] == "select" and slow["duration_ms"] >= 40
    assert SECRET not in slow["statement"]


def test_fast_queries_are_timed_by_operation_but_not_logged(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    stats = instrument(engine, slow_query_ms=10_000, stats=QueryStats())
    selects, inserts = duration_count("select"), duration_count("insert")

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO cards VALUES (:n)"), {"n": SECRET})
        conn.execute(text("SELECT count(*) FROM cards"))
        conn.execute(text("  /* report */ SELECT 1"))

    assert duration_count("insert") == inserts + 1
    assert duration_count("select") == selects + 2
    assert not [r for r in caplog.records if r.name == "tasklab.observe.sql"]
    snapshot = stats.snapshot()
    assert snapshot["query_count"] >= 3
    assert snapshot["slow_query_count"] == 0
    assert 0 < snapshot["avg_ms"] <= snapshot["max_ms"]


def test_instrumenting_twice_does_not_count_twice(engine: Engine) -> None:
    stats = QueryStats()
    instrument(engine, slow_query_ms=10_000, stats=stats)
    instrument(engine, slow_query_ms=10_000, stats=stats)

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))

    assert stats.snapshot()["query_count"] == 1


def test_the_ring_of_slow_queries_keeps_only_the_most_recent(engine: Engine) -> None:
    stats = instrument(engine, slow_query_ms=0, stats=QueryStats(max_recent=3))

    with engine.connect() as conn:
        for i in range(5):
            conn.execute(text(f"SELECT pause_ms(1) AS q{i}"))

    recent = stats.snapshot()["recent_slow_queries"]
    assert [q["statement"].rsplit(" ", 1)[1] for q in recent] == ["q4", "q3", "q2"]


async def test_an_async_engine_is_instrumented_through_its_sync_engine(tmp_path: Path) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.sqlite'}")
    stats = instrument(engine, slow_query_ms=10_000, stats=QueryStats())
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()

    assert stats.snapshot()["query_count"] >= 1


@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("SELECT 1", "select"),
        ("  -- comment\n  insert into t values (1)", "insert"),
        ("/* x */ UPDATE t SET a = 1", "update"),
        ("delete from t", "delete"),
        ("WITH old AS (SELECT id FROM t) DELETE FROM t WHERE id IN (SELECT id FROM old)", "delete"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "select"),
        ("PRAGMA journal_mode=WAL", "other"),
        ("CREATE TABLE t (a INT)", "other"),
    ],
)
def test_the_operation_is_the_statements_leading_verb(statement: str, operation: str) -> None:
    assert operation_of(statement) == operation


def test_redaction_keeps_identifiers_and_placeholders_but_not_literals() -> None:
    sql = "SELECT t1.a, $1, %(id_1)s FROM t1 WHERE name = 'O''Brien' AND n > 3.5e2 LIMIT 10"

    assert redact(sql) == "SELECT t1.a, $1, %(id_1)s FROM t1 WHERE name = ? AND n > ? LIMIT ?"
