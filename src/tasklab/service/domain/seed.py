"""``tasklab seed``: users with tokens and points, products with stock, sample sync files.

Idempotent: what exists is kept (stock, balances, orders); what is missing is added. Tokens
listed in an existing tokens file are kept if they still match, so re-running writes the same
file; users without one get a fresh token. ``reset`` deletes all shop and sync data first.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.database import make_engine, writing
from tasklab.migrations import migrate
from tasklab.service.domain import tokens
from tasklab.service.domain.catalog_cache import CatalogCache
from tasklab.service.domain.models import (
    SHOP_TABLES,
    LedgerEntry,
    LedgerKind,
    PointAccount,
    Product,
    SyncFile,
    User,
)
from tasklab.service.domain.sync import write_sample_files
from tasklab.settings import Settings

CATEGORIES = ("books", "games", "garden", "kitchen", "music", "outdoor", "tools", "toys")
ADMIN_NAME = "admin"
DAY_S = 86_400.0
EXPIRING_SHARE = 5  # one fifth of each grant expires within a week
LONG_EXPIRY_DAYS = 365


@dataclass(frozen=True)
class SeedReport:
    users_created: int
    users_total: int
    products_created: int
    products_total: int
    sync_files: int
    tokens_out: Path


def default_tokens_path(settings: Settings) -> Path:
    return settings.home_dir / "tokens.jsonl"


def seed(
    settings: Settings,
    *,
    users: int,
    products: int,
    stock: int,
    points: int,
    tokens_out: Path | None = None,
    reset: bool = False,
    now: float | None = None,
) -> SeedReport:
    """Migrate, then make sure the data exists; write one JSON line per user to tokens_out."""
    migrate(settings)
    now = time.time() if now is None else now
    out = tokens_out or default_tokens_path(settings)
    engine = make_engine(settings)
    try:
        with writing(engine) as conn:
            if reset:
                _wipe(conn)
            products_created = _ensure_products(conn, products, stock, now)
            users_created = _ensure_users(conn, users, points, now)
            files = _ensure_sync_files(conn, settings.home_dir, now)
            people = _users(conn, users)
            lines = _tokens(conn, people, _known_tokens(out))
            products_total = conn.execute(
                sa.select(sa.func.count()).select_from(Product)
            ).scalar_one()
        _write_tokens(out, lines)
    finally:
        engine.dispose()
    _clear_catalog_cache(settings)
    return SeedReport(users_created, len(people), products_created, int(products_total), files, out)


def _clear_catalog_cache(settings: Settings) -> None:
    """Products may have been created or reset: no process may keep serving old ones."""
    cache = CatalogCache.for_settings(settings, l1=False)
    if cache is not None:
        try:
            cache.clear()
        finally:
            cache.close()


def _wipe(conn: Connection) -> None:
    for model in SHOP_TABLES:
        conn.execute(sa.delete(model))


def _user_names(count: int) -> list[str]:
    return [*(f"user-{i:05d}" for i in range(1, count + 1)), ADMIN_NAME]


def _ensure_products(conn: Connection, count: int, stock: int, now: float) -> int:
    existing = set(conn.execute(sa.select(Product.name)).scalars())
    rows = []
    for i in range(1, count + 1):
        name = f"Product {i:05d}"
        if name in existing:
            continue
        price_cents = random.Random(name).randrange(100, 20_000)
        rows.append(
            {
                "name": name,
                "category": CATEGORIES[i % len(CATEGORIES)],
                "price_cents": price_cents,
                "stock": stock,
                "initial_stock": stock,
                "updated_at": now,
            }
        )
    if rows:
        conn.execute(sa.insert(Product), rows)
    return len(rows)


def _ensure_users(conn: Connection, count: int, points: int, now: float) -> int:
    names = _user_names(count)
    existing = set(conn.execute(sa.select(User.name)).scalars())
    new = [n for n in names if n not in existing]
    if not new:
        return 0
    # An empty hash matches no secret: the token step below gives each user a real one.
    conn.execute(
        sa.insert(User),
        [
            {"name": n, "token_hash": "", "is_admin": n == ADMIN_NAME, "created_at": now}
            for n in new
        ],
    )
    wanted = set(new)
    ids = [r.id for r in conn.execute(sa.select(User.id, User.name)) if r.name in wanted]
    conn.execute(
        sa.insert(PointAccount),
        [{"user_id": uid, "balance": points, "updated_at": now} for uid in ids],
    )
    grants = [g for uid in ids for g in _grants(uid, points, now)]
    if grants:
        conn.execute(sa.insert(LedgerEntry), grants)
    return len(new)


def _grants(user_id: int, points: int, now: float) -> list[dict[str, Any]]:
    """The initial grant, split: a fifth expires in 1..6 days, the rest in a year."""
    soon = points // EXPIRING_SHARE
    parts = [
        (points - soon, now + LONG_EXPIRY_DAYS * DAY_S),
        (soon, now + (1 + user_id % 6) * DAY_S),
    ]
    return [
        {
            "user_id": user_id,
            "delta": amount,
            "kind": LedgerKind.GRANT.value,
            "order_id": None,
            "expires_at": expires_at,
            "created_at": now,
        }
        for amount, expires_at in parts
        if amount > 0
    ]


def _ensure_sync_files(conn: Connection, home_dir: Path, now: float) -> int:
    files = write_sample_files(home_dir)
    existing = {
        (r.platform, r.name) for r in conn.execute(sa.select(SyncFile.platform, SyncFile.name))
    }
    new = [{**f, "created_at": now} for f in files if (f["platform"], f["name"]) not in existing]
    if new:
        conn.execute(sa.insert(SyncFile), new)
    for f in files:  # the home directory may have moved since the first seed
        conn.execute(
            sa.update(SyncFile)
            .where(SyncFile.platform == f["platform"], SyncFile.name == f["name"])
            .values(path=f["path"])
        )
    return len(files)


def _users(conn: Connection, count: int) -> list[Any]:
    wanted = set(_user_names(count))
    rows = conn.execute(
        sa.select(User.id, User.name, User.token_hash, User.is_admin).order_by(User.id)
    )
    return [r for r in rows if r.name in wanted]


def _known_tokens(path: Path) -> dict[int, str]:
    """user_id -> token from a previous tokens file (unreadable lines are ignored)."""
    if not path.is_file():
        return {}
    known = {}
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
            known[int(item["user_id"])] = str(item["token"])
        except (ValueError, KeyError, TypeError):
            continue
    return known


def _tokens(conn: Connection, people: list[Any], known: dict[int, str]) -> list[dict[str, Any]]:
    lines, rotated = [], []
    for user in people:
        token = known.get(user.id)
        parts = tokens.split(token) if token else None
        if parts is None or parts[0] != user.id or not tokens.matches(parts[1], user.token_hash):
            token, token_hash = tokens.issue(user.id)
            rotated.append({"uid": user.id, "token_hash": token_hash})
        lines.append(
            {"user_id": user.id, "name": user.name, "token": token, "admin": bool(user.is_admin)}
        )
    if rotated:
        conn.execute(
            sa.update(User)
            .where(User.id == sa.bindparam("uid"))
            .values(token_hash=sa.bindparam("token_hash")),
            rotated,
        )
    return lines


def _write_tokens(path: Path, lines: list[dict[str, Any]]) -> None:
    """One JSON line per user; readable by the owner only (these are credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(tmp, path)
