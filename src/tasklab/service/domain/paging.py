"""Pages of results and time rendering shared by the listings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MAX_PAGE_SIZE = 100
MAX_PAGE = 100_000  # bounds OFFSET so a silly page number cannot overflow the database


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    page: int
    page_size: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "page": self.page,
            "page_size": self.page_size,
            "total": self.total,
        }


def offset_of(page: int, page_size: int) -> int:
    return (page - 1) * page_size


def at(ts: float | None) -> datetime | None:
    """Epoch seconds -> aware UTC datetime (rendered as ISO 8601 by the API)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def money(cents: int) -> float:
    return cents / 100
