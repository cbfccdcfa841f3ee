"""Lab fixtures: settings on embedded defaults (the lab starts its own Redis and workers), and a
console that records instead of printing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from tasklab.settings import Settings


@pytest.fixture
def lab_settings(tmp_path: Path) -> Settings:
    """No URLs: every lab run starts its own embedded Redis and scratch SQLite."""
    return Settings(home_dir=tmp_path / ".tasklab", worker_concurrency=2)


@pytest.fixture
def console() -> Console:
    return Console(file=io.StringIO(), width=200, force_terminal=False)
