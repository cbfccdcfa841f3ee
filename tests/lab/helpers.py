"""Small helpers for reading what a lab command wrote and printed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console


def printed(console: Console) -> str:
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def read_json(path: Path | None) -> dict[str, Any]:
    assert path is not None and path.is_file(), path
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def slo(data: dict[str, Any], figure: str) -> dict[str, Any]:
    matches = [s for s in data["slos"] if s["figure"] == figure]
    assert len(matches) == 1, (figure, data["slos"])
    return matches[0]
