"""Paths and helpers shared by the observability tests."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "tasklab.json"
ALERTS_DOC = ROOT / "docs" / "alerts.md"

T = TypeVar("T")


def require_binary(name: str) -> str:
    """The path of a system tool the test drives; missing means FAIL (make test installs it)."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
    )
    if found is None:
        pytest.fail(
            f"{name} is not installed (Debian package `prometheus`; "
            "scripts/test_prereqs.sh installs it)"
        )
    return found


def wait_until(
    probe: Callable[[], T],
    accept: Callable[[T], bool],
    *,
    timeout_s: float,
    poll_s: float = 0.2,
    what: str = "condition",
) -> T:
    """Call ``probe`` until ``accept`` says yes; fail with the last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not accept(value):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met after {timeout_s} s; last value: {value!r}")
        time.sleep(poll_s)
        value = probe()
    return value
