"""Data sync: sample partner files (CSV and JSON) and the job body that loads them.

``tasklab seed`` writes the files under ``<home_dir>/sync/<platform>/`` and registers them in
``sync_files``. A sync job parses each file (reporting progress per file), keeps the good rows
in ``sync_records`` and records each bad row in ``sync_row_errors``; a bad row or a missing
file is data, not a crash. Re-syncing a file replaces its rows.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tasklab.jobs import JobContext
from tasklab.service.domain.models import SyncFile, SyncRecord, SyncRowError

PLATFORMS = ("shopify", "amazon", "etsy")
FILES_PER_PLATFORM = 4
ROWS_PER_FILE = 200
BAD_ROW_EVERY = 40  # one deliberately broken row in this many
FIELDS = ("external_id", "sku", "name", "price", "quantity")
MAX_ERRORS_IN_RESULT = 20
# What a deliberately broken row holds, per column: each is refused by SyncRow.
_BAD_VALUES = {"price": ("", "n/a", "-5"), "quantity": ("", "n/a", "-5"), "external_id": ("",)}


class SyncRow(BaseModel):
    """One partner row; CSV gives strings, JSON gives numbers: both are accepted."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    external_id: str = Field(min_length=1, max_length=64)
    sku: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    price: Decimal = Field(ge=0, le=1_000_000, decimal_places=2)
    quantity: int = Field(ge=0, le=1_000_000)

    @field_validator("price", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Any:
        if isinstance(value, float):  # JSON numbers: go through str to keep 2 decimals
            return str(value)
        return value


@dataclass
class ParsedFile:
    file_id: int
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, message)


# --- sample files ------------------------------------------------------------------------------


def write_sample_files(
    home_dir: Path,
    *,
    platforms: tuple[str, ...] = PLATFORMS,
    files_per_platform: int = FILES_PER_PLATFORM,
    rows_per_file: int = ROWS_PER_FILE,
) -> list[dict[str, Any]]:
    """Write the sample files (deterministic content); return their sync_files values."""
    out = []
    for platform in platforms:
        folder = home_dir / "sync" / platform
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, files_per_platform + 1):
            fmt = "csv" if n % 2 else "json"
            path = folder / f"{platform}-{n:03d}.{fmt}"
            rows = sample_rows(platform, n, rows_per_file)
            if fmt == "csv":
                _write_csv(path, rows)
            else:
                _write_json(path, rows)
            out.append(
                {
                    "platform": platform,
                    "name": path.name,
                    "format": fmt,
                    "path": str(path.resolve()),
                }
            )
    return out


def sample_rows(platform: str, file_no: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{platform}-{file_no}")
    rows: list[dict[str, Any]] = []
    for i in range(count):
        row: dict[str, Any] = {
            "external_id": f"{platform[:3]}-{file_no:03d}-{i:05d}",
            "sku": f"SKU-{rng.randrange(10_000, 99_999)}",
            "name": f"{platform.title()} item {file_no}-{i}",
            "price": f"{rng.randrange(100, 50_000) / 100:.2f}",
            "quantity": rng.randrange(0, 500),
        }
        if i % BAD_ROW_EVERY == BAD_ROW_EVERY - 1:
            column = rng.choice(sorted(_BAD_VALUES))
            row[column] = rng.choice(_BAD_VALUES[column])
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps([_as_json_types(r) for r in rows], indent=0))


def _as_json_types(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    with contextlib.suppress(InvalidOperation):  # a deliberately bad price stays a string
        out["price"] = float(Decimal(str(row["price"])))
    return out


# --- parsing -----------------------------------------------------------------------------------


def parse_file(file_id: int, path: Path, fmt: str) -> ParsedFile:
    parsed = ParsedFile(file_id)
    try:
        raw = _read_csv(path) if fmt == "csv" else _read_json(path)
    except (OSError, ValueError, csv.Error) as e:
        parsed.errors.append((0, f"cannot read file: {type(e).__name__}: {e}"[:500]))
        return parsed
    seen: set[str] = set()
    for line, item in raw:
        _parse_row(parsed, line, item, seen)
    return parsed


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    with path.open(newline="") as f:
        # line 1 is the header, so the first row is line 2 (as an editor shows it)
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]


def _read_json(path: Path) -> list[tuple[int, Any]]:
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError("a JSON sync file holds a list of rows")
    return [(i + 1, row) for i, row in enumerate(data)]


def _parse_row(parsed: ParsedFile, line: int, item: Any, seen: set[str]) -> None:
    try:
        row = SyncRow.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "row"
        parsed.errors.append((line, f"{where}: {err['msg']}"[:500]))
        return
    if row.external_id in seen:
        parsed.errors.append((line, f"external_id: duplicate {row.external_id!r}"))
        return
    seen.add(row.external_id)
    parsed.records.append(
        {
            "external_id": row.external_id,
            "sku": row.sku,
            "name": row.name,
            "price_cents": int(row.price * 100),
            "quantity": row.quantity,
        }
    )


# --- the job body ------------------------------------------------------------------------------


def run_sync(ctx: JobContext, file_ids: list[int]) -> dict[str, Any]:
    """Parse the files (progress per file), then write every result in the job's transaction.

    Nothing is written through ``ctx`` after the transaction opens: on SQLite that transaction
    holds the write lock until the job returns."""
    files = _files(ctx.engine, file_ids)
    parsed: list[tuple[Any, ParsedFile]] = []
    for i, f in enumerate(files, start=1):
        parsed.append((f, parse_file(f.id, Path(f.path), f.format)))
        ctx.progress(i, len(files), f"parsed {f.name}")
    with ctx.transaction() as session:
        _store(session, ctx.id, parsed, time.time())
    return _summary(parsed, missing=sorted(set(file_ids) - {f.id for f in files}))


def _files(engine: Engine, file_ids: list[int]) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(
                    SyncFile.id, SyncFile.platform, SyncFile.name, SyncFile.path, SyncFile.format
                )
                .where(SyncFile.id.in_(file_ids))
                .order_by(SyncFile.id)
            )
        )


def _store(session: Session, job_id: str, parsed: list[tuple[Any, ParsedFile]], now: float) -> None:
    ids = [f.id for f, _ in parsed]
    if not ids:
        return
    opts = {"synchronize_session": False}
    session.execute(
        sa.delete(SyncRecord).where(SyncRecord.file_id.in_(ids)), execution_options=opts
    )
    session.execute(
        sa.delete(SyncRowError).where(SyncRowError.file_id.in_(ids)), execution_options=opts
    )
    records = [
        {**r, "file_id": f.id, "platform": f.platform, "synced_at": now}
        for f, p in parsed
        for r in p.records
    ]
    errors = [
        {"file_id": f.id, "job_id": job_id, "line": line, "error": msg, "created_at": now}
        for f, p in parsed
        for line, msg in p.errors
    ]
    if records:
        session.execute(sa.insert(SyncRecord), records)
    if errors:
        session.execute(sa.insert(SyncRowError), errors)
    session.execute(
        sa.update(SyncFile)
        .where(SyncFile.id.in_(ids))
        .values(last_synced_at=now, last_job_id=job_id),
        execution_options=opts,
    )


def _summary(parsed: list[tuple[Any, ParsedFile]], *, missing: list[int]) -> dict[str, Any]:
    per_file = [
        {"file_id": f.id, "name": f.name, "rows": len(p.records), "errors": len(p.errors)}
        for f, p in parsed
    ]
    errors = [
        {"file_id": f.id, "line": line, "error": msg} for f, p in parsed for line, msg in p.errors
    ][:MAX_ERRORS_IN_RESULT]
    return {
        "files": len(parsed),
        "rows": sum(x["rows"] for x in per_file),
        "row_errors": sum(x["errors"] for x in per_file),
        "per_file": per_file,
        "first_errors": errors,
        "missing_file_ids": missing,
    }
