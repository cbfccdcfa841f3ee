"""Parametrisations of the ``database_url`` fixture (tests/conftest.py)."""

import pytest

# A test over a minute on each backend: SQLite in `make test`, PostgreSQL in `make test-long`
# (the same code paths on PostgreSQL run in `make test` through shorter tests).
SQLITE_HERE_POSTGRES_LONG = pytest.mark.parametrize(
    "database_url",
    ["sqlite", pytest.param("postgres", marks=pytest.mark.long)],
    indirect=True,
)
