"""Typer commands of the console; ``tasklab.cli`` registers them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from tasklab.settings import Settings

console = Console()


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.find_root().obj
    if not isinstance(settings, Settings):
        raise TypeError("ctx.obj must be the tasklab Settings")
    return settings


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: the API's host.")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8100,
) -> None:
    """Serve the jobs console alone (it is also at /console on the API)."""
    import uvicorn

    from tasklab.service.console import create_console_app

    settings = _settings(ctx)
    bound = host or settings.api_host
    console.print(f"console at http://{bound}:{port}/console", highlight=False)
    uvicorn.run(
        create_console_app(settings),
        host=bound,
        port=port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


def bench(
    ctx: typer.Context,
    rows: Annotated[
        int, typer.Option(min=100, max=50_000_000, help="Job rows to fill.")
    ] = 1_000_000,
    repeat: Annotated[int, typer.Option(min=1, max=1000, help="Requests per page.")] = 20,
    days: Annotated[float, typer.Option(min=0.01, help="Creation times spread over.")] = 30.0,
) -> None:
    """Page times of the console with ROWS job rows, in a fresh database: SQLite in a
    temporary folder, or the (empty) PostgreSQL database DATABASE_URL names."""
    from tasklab.lab.console_bench import run_console_bench

    run_console_bench(_settings(ctx), rows=rows, repeat=repeat, days=days, console=console)
