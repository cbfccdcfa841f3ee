"""Typer command functions for the reference service; ``tasklab.cli`` registers them.

Each takes the Settings from ``ctx.obj`` and calls into ``tasklab.service.domain``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tasklab.settings import Settings

console = Console()
err_console = Console(stderr=True)


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    if not isinstance(settings, Settings):
        raise TypeError("ctx.obj must be the tasklab Settings")
    return settings


def seed(
    ctx: typer.Context,
    users: Annotated[int, typer.Option(min=0, max=1_000_000, help="Users to create.")] = 100,
    products: Annotated[int, typer.Option(min=0, max=1_000_000)] = 50,
    stock: Annotated[
        int, typer.Option(min=0, max=1_000_000_000, help="Initial stock of each new product.")
    ] = 100,
    points: Annotated[
        int, typer.Option(min=0, max=1_000_000_000, help="Initial points of each new user.")
    ] = 1000,
    tokens_out: Annotated[
        Path | None,
        typer.Option(help="Where to write one JSON line per user (default: <home>/tokens.jsonl)."),
    ] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Delete all shop data first.")] = False,
) -> None:
    """Migrate, then create users (with tokens and points), products and sample sync files.
    Safe to re-run: existing data is kept and known tokens stay valid."""
    from tasklab.service.domain.seed import seed as run_seed

    report = run_seed(
        _settings(ctx),
        users=users,
        products=products,
        stock=stock,
        points=points,
        tokens_out=tokens_out,
        reset=reset,
    )
    console.print(
        f"seeded: {report.users_created} new user(s) ({report.users_total} with "
        f"tokens), {report.products_created} new product(s) "
        f"({report.products_total} in all), {report.sync_files} sync file(s)"
    )
    console.print(f"tokens: {report.tokens_out}", highlight=False)


def check_invariants(
    ctx: typer.Context,
    pending_threshold_s: Annotated[
        float, typer.Option(min=0, help="An order pending longer than this is a violation.")
    ] = 60.0,
) -> None:
    """Verify stock, points and order invariants on the live database; exit 1 if any fails."""
    from tasklab.service.domain.invariants import check_invariants as run_checks

    violations = run_checks(_settings(ctx), pending_threshold_s=pending_threshold_s)
    if violations:
        for line in violations:
            err_console.print(f"violation: {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print("invariants hold")


def db_upgrade(ctx: typer.Context) -> None:
    """Bring the database schema to the latest revision (idempotent)."""
    from tasklab.migrations import migrate
    from tasklab.service.app import schema_head

    settings = _settings(ctx)
    migrate(settings)
    console.print(f"database at {schema_head(settings)}")


def tokens_issue(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The user's name or id.")],
    ttl_days: Annotated[
        float | None,
        typer.Option(min=0.0001, help="Days until the token expires (default: never)."),
    ] = None,
) -> None:
    """Issue a new token for a user, replacing theirs; prints one JSON line with it."""
    import orjson

    from tasklab.service.domain.token_admin import UnknownUser, issue

    try:
        issued = issue(_settings(ctx), user, ttl_s=None if ttl_days is None else ttl_days * 86_400)
    except UnknownUser as e:
        err_console.print(f"error: {e}", highlight=False)
        raise typer.Exit(2) from e
    line = {
        "user_id": issued.user_id,
        "name": issued.name,
        "token": issued.token,
        "expires_at": issued.expires_at,
    }
    print(orjson.dumps(line).decode())


def tokens_revoke(
    ctx: typer.Context, user: Annotated[str, typer.Argument(help="The user's name or id.")]
) -> None:
    """Revoke a user's token (a running API stops accepting it within 10 s)."""
    from tasklab.service.domain.token_admin import UnknownUser, revoke

    try:
        user_id = revoke(_settings(ctx), user)
    except UnknownUser as e:
        err_console.print(f"error: {e}", highlight=False)
        raise typer.Exit(2) from e
    console.print(f"revoked the token of user {user_id}")
