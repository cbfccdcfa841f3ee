"""Typer commands that operate a running stack; ``tasklab.cli`` registers them.

They find the stack through its record in the home folder (``tasklab.stack_record``).
"""

from __future__ import annotations

from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from tasklab import stack_control
from tasklab.settings import Settings

console = Console()
err_console = Console(stderr=True)


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.find_root().obj
    if not isinstance(settings, Settings):
        raise TypeError("ctx.obj must be the tasklab Settings")
    return settings


def notice(text: str) -> None:
    err_console.print(f"notice: {text}", highlight=False, soft_wrap=True)


def complain(text: str) -> None:
    err_console.print(text, highlight=False, soft_wrap=True)


def say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def given_options(ctx: click.Context | typer.Context, *, skip: set[str]) -> list[str]:
    """The options given on this command line, as arguments for the same command."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        # By name: Typer may bring a click of its own, whose enum is not click's.
        source = ctx.get_parameter_source(name)
        if name in skip or getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[name]
        if getattr(param, "is_flag", False):
            args += [param.opts[0]] if value else []
        else:
            args += [param.opts[0], str(value)]
    return args


def detach_up(ctx: typer.Context) -> None:
    """``tasklab up --detach``: the same ``up`` in the background."""
    args = given_options(ctx, skip={"detach", "background"})
    settings = _settings(ctx)
    code = stack_control.detach(
        settings.home_dir,
        args,
        start_window_s=settings.supervisor_start_window_s,
        notice=notice,
        say=say,
        err=complain,
    )
    raise typer.Exit(code)


def stop(ctx: typer.Context) -> None:
    """Stop the stack that runs with this home folder (SIGTERM; its parts stop within 10 s)."""
    stack_control.stop(_settings(ctx).home_dir, notice=notice, say=say)


def restart(
    ctx: typer.Context,
    part: Annotated[
        str | None, typer.Argument(help="worker, api, beat, exporter or flower; all if omitted")
    ] = None,
) -> None:
    """Restart one part of the running stack (all parts without PART; Redis keeps running)."""
    stack_control.restart(_settings(ctx).home_dir, part, notice=notice, say=say)


def logs(
    ctx: typer.Context,
    part: Annotated[
        str | None, typer.Argument(help="a part (worker, api, ..., redis); all parts if omitted")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Last lines to show")] = 50,
) -> None:
    """Show the stack's logs (kept in <home>/logs, also after it stopped)."""
    path = stack_control.log_file(_settings(ctx).home_dir, part)
    last, offset = stack_control.tail(path, lines)
    for line in last:
        typer.echo(line)
    if follow:
        try:
            for line in stack_control.follow(path, offset):
                typer.echo(line)
        except KeyboardInterrupt:
            pass


def ps(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What the running stack runs: each part's state, pid, port, uptime and restarts."""
    from tasklab.stack_record import running_stack

    record = running_stack(_settings(ctx).home_dir, notice=notice)
    if as_json:
        import orjson

        data = (
            None
            if record is None
            else {**record.model_dump(), "rows": stack_control.ps_rows(record)}
        )
        typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    if record is None:
        say(f"no stack runs in {_settings(ctx).home_dir}")
        return
    say(stack_control.stack_summary(record))
    table = Table()
    for col in ("part", "state", "pid", "port", "uptime", "restarts"):
        table.add_column(col)
    for row in stack_control.ps_rows(record):
        table.add_row(
            row["part"],
            row["state"],
            str(row["pid"] or "-"),
            str(row["port"] or "-"),
            stack_control.duration(row["uptime_s"]),
            str(row["restarts"]),
        )
    console.print(table)
