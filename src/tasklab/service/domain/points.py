"""Points: balance, ledger history and expiring grants, always read from the database."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tasklab.database import SqlRunner
from tasklab.service.domain.models import LedgerEntry, LedgerKind, PointAccount
from tasklab.service.domain.paging import Page, at, offset_of

DAY_S = 86_400.0
MAX_EXPIRING_ITEMS = 100


def entry_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "delta": row.delta,
        "kind": row.kind,
        "order_id": row.order_id,
        "expires_at": at(row.expires_at),
        "created_at": at(row.created_at),
    }


class Points:
    def __init__(self, sql: SqlRunner) -> None:
        self.sql = sql

    async def balance(self, user_id: int) -> dict[str, Any]:
        stmt = sa.select(PointAccount.balance, PointAccount.updated_at).where(
            PointAccount.user_id == user_id
        )
        row = await self.sql.read(lambda conn: conn.execute(stmt).first())
        return {
            "user_id": user_id,
            "balance": row.balance if row else 0,
            "updated_at": at(row.updated_at) if row else None,
        }

    async def history(self, user_id: int, *, page: int, page_size: int) -> Page:
        """The ledger, newest first (two queries)."""
        mine = LedgerEntry.user_id == user_id
        rows_stmt = (
            sa.select(
                LedgerEntry.id,
                LedgerEntry.delta,
                LedgerEntry.kind,
                LedgerEntry.order_id,
                LedgerEntry.expires_at,
                LedgerEntry.created_at,
            )
            .where(mine)
            .order_by(LedgerEntry.id.desc())
            .limit(page_size)
            .offset(offset_of(page, page_size))
        )
        total_stmt = sa.select(sa.func.count()).select_from(LedgerEntry).where(mine)

        def page_of(conn: Connection) -> tuple[Any, Any]:
            return conn.execute(rows_stmt).all(), conn.execute(total_stmt).scalar_one()

        rows, total = await self.sql.read(page_of)
        return Page([entry_dict(r) for r in rows], page, page_size, int(total))

    async def expiring(
        self, user_id: int, *, days: int, now: float | None = None
    ) -> dict[str, Any]:
        """Grants that expire within ``days``. ``total`` never exceeds the balance: points
        already spent cannot expire."""
        now = time.time() if now is None else now
        stmt = (
            sa.select(LedgerEntry.id, LedgerEntry.delta, LedgerEntry.expires_at)
            .where(
                LedgerEntry.user_id == user_id,
                LedgerEntry.kind == LedgerKind.GRANT.value,
                LedgerEntry.expires_at >= now,
                LedgerEntry.expires_at <= now + days * DAY_S,
            )
            .order_by(LedgerEntry.expires_at)
            .limit(MAX_EXPIRING_ITEMS)
        )
        balance_stmt = sa.select(PointAccount.balance).where(PointAccount.user_id == user_id)

        def grants_and_balance(conn: Connection) -> tuple[Any, int]:
            return conn.execute(stmt).all(), conn.execute(balance_stmt).scalar_one_or_none() or 0

        rows, balance = await self.sql.read(grants_and_balance)
        items = [
            {"entry_id": r.id, "points": r.delta, "expires_at": at(r.expires_at)} for r in rows
        ]
        total = min(balance, sum(r.delta for r in rows))
        return {"user_id": user_id, "days": days, "total": total, "items": items}
