"""The one CLI entry: ``tasklab ...``. Commands are thin; the work lives in the parts."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tasklab.errors import ConfigError, TasklabError
from tasklab.settings import Settings, describe, load_settings

app = typer.Typer(help="tasklab: a fast, observable, loss-free Celery job layer.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit (2 = bad input or configuration)."""
    err_console.print(f"error: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_of(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


@app.callback()
def _main(ctx: typer.Context) -> None:
    try:
        ctx.obj = load_settings()
    except ConfigError as e:
        fail(str(e))


@app.command("config")
def config_cmd(ctx: typer.Context) -> None:
    """Print the effective settings (secrets masked) and where each value came from."""
    table = Table(title="tasklab settings")
    for col in ("setting", "value", "source"):
        table.add_column(col)
    for key, value, source in describe(settings_of(ctx)):
        table.add_row(key, value, source)
    console.print(table)


@app.command()
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = "",
    concurrency: Annotated[int | None, typer.Option(min=1)] = None,
    pool: Annotated[str | None, typer.Option(help="prefork, threads or solo")] = None,
    hostname: Annotated[str, typer.Option(help="Celery node name")] = "tasklab@%h",
) -> None:
    """Run a Celery worker against the configured broker."""
    from tasklab.celery_app import QUEUES
    from tasklab.worker import build_worker_app

    settings = settings_of(ctx)
    celery = build_worker_app(settings)
    argv = ["worker", "--loglevel", settings.log_level, "-n", hostname,
            "-Q", queues or ",".join(QUEUES),
            "--concurrency", str(concurrency or settings.effective_concurrency),
            "--pool", pool or settings.worker_pool, "-E"]
    celery.worker_main(argv)


@app.command()
def beat(ctx: typer.Context) -> None:
    """Run Celery beat (the scheduler) against the configured broker."""
    from tasklab.worker import build_worker_app

    settings = settings_of(ctx)
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    celery = build_worker_app(settings)
    schedule = settings.home_dir / "celerybeat-schedule"
    celery.start(["beat", "--loglevel", settings.log_level, "--schedule", str(schedule)])


@app.command()
def api(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535)] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64)] = None,
) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    settings = settings_of(ctx)
    uvicorn.run("tasklab.service.app:create_app_from_env", factory=True,
                host=host or settings.api_host, port=port or settings.api_port,
                workers=workers or settings.api_workers, log_level=settings.log_level.lower(),
                access_log=False)


@app.command()
def up(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535)] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="uvicorn workers")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Celery processes")] = None,
    no_beat: Annotated[bool, typer.Option("--no-beat")] = False,
) -> None:
    """Run the whole stack: embedded Redis (if no URL is set), worker, beat and the API."""
    from tasklab.stack import run_stack

    settings = settings_of(ctx)
    run_stack(settings, host=host or settings.api_host, port=port or settings.api_port,
              api_workers=workers or settings.api_workers,
              concurrency=concurrency or settings.effective_concurrency, beat=not no_beat)


@app.command()
def demo(
    ctx: typer.Context,
    tasks: Annotated[int, typer.Option(min=1, max=1_000_000)] = 1000,
) -> None:
    """Start the embedded stack, run 1,000 no-op jobs through it and print the figures."""
    from tasklab.lab.demo import run_demo

    run_demo(settings_of(ctx), tasks=tasks, console=console)


def main(argv: list[str] | None = None) -> Any:
    from tasklab.processes import exit_on_sigterm

    exit_on_sigterm()
    try:
        return app(args=argv, standalone_mode=True)
    except TasklabError as e:
        err_console.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
