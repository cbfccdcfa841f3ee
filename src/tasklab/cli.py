"""The one CLI entry: ``tasklab ...``. Commands are thin; the work lives in the parts."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from tasklab.errors import ConfigError, TasklabError
from tasklab.settings import Settings, describe, load_settings

app = typer.Typer(
    help="tasklab: a fast, observable, loss-free Celery job layer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit (2 = bad input or configuration)."""
    err_console.print(f"error: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_of(ctx: typer.Context | click.Context) -> Settings:
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings)
    return settings


# Commands that run a stack of their own (or read the stack's record themselves): the others
# use the embedded Redis of the stack running with their home folder when no URL is set.
_OWN_STACK_COMMANDS = {"up", "demo", "stress", "bench", "tune", "drill", "load", "report"}
_OWN_STACK_COMMANDS |= {"config", "stop", "restart", "logs", "ps"}


@app.callback()
def _main(ctx: typer.Context) -> None:
    try:
        ctx.obj = load_settings()
    except ConfigError as e:
        fail(str(e))
    if ctx.invoked_subcommand not in _OWN_STACK_COMMANDS:
        from tasklab.stack_commands import notice
        from tasklab.stack_record import attach_running_stack

        ctx.obj = attach_running_stack(ctx.obj, notice=notice)


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
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="this node's /metrics; 0: none; default 9811 or free"),
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="address of this node's /metrics; default api_host")
    ] = None,
) -> None:
    """Run a Celery worker against the configured broker."""
    from tasklab.observe import multiproc

    settings = settings_of(ctx)
    try:  # before the worker's modules import prometheus_client (multiproc's note on order)
        multiproc.start_node_metrics(settings, hostname, port=metrics_port, host=metrics_host)
    except TasklabError as e:
        fail(str(e))
    from tasklab.celery_app import QUEUES
    from tasklab.worker import build_worker_app

    celery = build_worker_app(settings)
    argv = [
        "worker",
        "--loglevel",
        settings.log_level,
        "-n",
        hostname,
        "-Q",
        queues or ",".join(QUEUES),
        "--concurrency",
        str(concurrency or settings.effective_concurrency),
        "--pool",
        pool or settings.worker_pool,
        # Mingle asks the other workers for their revoked ids and waits up to a second for
        # answers at every start; gossip follows the other workers' events. tasklab cancels
        # through SQL and watches workers by their heartbeats (kept): neither is needed.
        "--without-mingle",
        "--without-gossip",
    ]
    if settings.task_events:
        argv.append("-E")
    if settings.worker_nice:
        os.nice(settings.worker_nice)  # inherited by the pool's processes
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

    from tasklab.observe import multiproc

    settings = settings_of(ctx)
    if (workers or settings.api_workers) > 1 and multiproc.dir_from_env() is None:
        # Several uvicorn processes: metrics must be aggregated over all of them.
        os.environ.update(multiproc.prepare_dir(settings))
    uvicorn.run(
        "tasklab.service.app:create_app_from_env",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers or settings.api_workers,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@app.command()
def up(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="default: 8000, or a free one")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="uvicorn workers")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Celery processes")] = None,
    nodes: Annotated[
        int,
        typer.Option(
            min=1, max=16, help="Worker nodes, each its own process tree, home and metrics port"
        ),
    ] = 1,
    no_beat: Annotated[bool, typer.Option("--no-beat")] = False,
    exporter_port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="0: no exporter; default 9810 or free")
    ] = None,
    flower: Annotated[
        bool, typer.Option("--flower", help="Also run Flower (if installed)")
    ] = False,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background, logs in <home>/logs")
    ] = False,
    background: Annotated[bool, typer.Option("--background", hidden=True)] = False,
) -> None:
    """Run the whole stack: embedded Redis (if no URL is set), worker, beat and the API."""
    from tasklab.stack import run_stack, stack_options

    if detach:
        from tasklab.stack_commands import detach_up

        detach_up(ctx)
    settings = settings_of(ctx)
    opts = stack_options(
        settings,
        host=host,
        port=port,
        workers=workers,
        concurrency=concurrency,
        beat=not no_beat,
        exporter_port=exporter_port,
        flower=flower,
        background=background,
        nodes=nodes,
    )
    if run_stack(settings, opts) is not None:
        raise typer.Exit(1)  # a part kept failing at its start; the supervisor said why


@app.command()
def exporter(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(min=1, max=65535)] = None,
    host: Annotated[str | None, typer.Option()] = None,
    interval: Annotated[float, typer.Option(min=0.2, help="refresh seconds")] = 5.0,
    celery_app: Annotated[
        str | None,
        typer.Option("--app", help="module:attribute of any Celery app to watch instead"),
    ] = None,
) -> None:
    """Serve queue, worker, beat and Celery task metrics for Prometheus on their own port."""
    from tasklab.observe import multiproc

    # The exporter serves its own registry only; in a stack's shared folder its gauges could
    # not drop a series (prometheus_client cannot remove labels in multiprocess mode).
    os.environ.pop(multiproc.ENV_VAR, None)
    from tasklab.observe.exporter import load_app, run_exporter

    settings = settings_of(ctx)
    try:
        app = load_app(celery_app) if celery_app else None
    except TasklabError as e:
        fail(str(e))
    port = port or settings.exporter_port or 9810
    run_exporter(settings, port, host=host, interval_s=interval, app=app)


@app.command()
def status(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Workers, queue depths and ages, jobs by status and fallback state, in one table."""
    from tasklab.observe.status import collect_status, render_status

    report = collect_status(settings_of(ctx))
    if as_json:
        import orjson

        typer.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        console.print(render_status(report))


@app.command()
def purge(
    ctx: typer.Context,
    queue: Annotated[str, typer.Argument(help="Queue to empty")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False,
) -> None:
    """Delete every waiting message of one queue (job records stay; the reaper re-publishes
    QUEUED jobs whose message is gone, so cancel those jobs first if they must not run)."""
    from tasklab.celery_app import QUEUES, make_celery

    if queue not in QUEUES:
        fail(f"unknown queue {queue!r}; one of {', '.join(QUEUES)}")
    if not yes and not typer.confirm(f"Delete every waiting message in {queue!r}?"):
        raise typer.Exit(1)
    celery = make_celery(settings_of(ctx), include=[])
    with celery.connection_for_write() as conn:
        removed = conn.default_channel.queue_purge(queue) or 0
    celery.close()
    console.print(f"purged {removed} message(s) from {queue}")


@app.command()
def flower(ctx: typer.Context, port: Annotated[int, typer.Option(min=1, max=65535)] = 5555) -> None:
    """Run Flower (the Celery web monitor) against the configured broker, if installed."""
    from tasklab.worker import build_worker_app

    settings = settings_of(ctx)
    build_worker_app(settings).start(["flower", f"--port={port}", f"--address={settings.api_host}"])


@app.command()
def demo(
    ctx: typer.Context,
    tasks: Annotated[int, typer.Option(min=1, max=1_000_000)] = 1000,
) -> None:
    """The lab's tour on embedded defaults: stress, bench overhead, a kill and an outage
    drill, a short soak, a load test on the reference service; one SLO table and
    .tasklab/report/index.html."""
    from tasklab.lab.demo import run_demo

    outcome = run_demo(settings_of(ctx), tasks=tasks, console=console)
    raise typer.Exit(0 if outcome.ok else 1)


def _register_part_commands() -> None:
    from tasklab.lab import commands as lab

    for name in ("stress", "bench", "tune", "report", "drill", "load"):
        app.command(name)(getattr(lab, name))
    from tasklab.service import commands as service

    app.command("seed")(service.seed)
    app.command("check-invariants")(service.check_invariants)
    tokens_app = typer.Typer(help="The service's bearer tokens.", no_args_is_help=True)
    tokens_app.command("issue")(service.tokens_issue)
    tokens_app.command("revoke")(service.tokens_revoke)
    app.add_typer(tokens_app, name="tokens")
    from tasklab.service.console import commands as console_commands

    app.command("console")(console_commands.serve)
    app.command("console-bench")(console_commands.bench)
    from tasklab import stack_commands as stack

    for name in ("stop", "restart", "logs", "ps"):
        app.command(name)(getattr(stack, name))


_register_part_commands()

jobs_app = typer.Typer(help="Inspect and operate durable jobs.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply migrations up to the latest schema (also done by `up`, `seed` and `demo`)."""
    from tasklab.migrations import migrate

    migrate(settings_of(ctx))
    console.print("database schema is up to date")


def _manager(ctx: typer.Context) -> Any:
    import importlib

    from tasklab.celery_app import TASK_MODULES
    from tasklab.jobs import JobManager

    settings = settings_of(ctx)
    # `retry` re-publishes a job by name: its declaring module must be imported here too.
    for module in (*TASK_MODULES, *settings.imports):
        importlib.import_module(module)
    return JobManager(settings, local_fallback=False)


def _job_table(jobs: list[Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "task", "status", "attempt", "queue", "via", "error"):
        table.add_column(col, overflow="fold")
    for j in jobs:
        table.add_row(
            j.id,
            j.task,
            j.status.value,
            f"{j.attempt}/{j.max_attempts}",
            j.queue,
            j.via,
            (j.error or "")[:80],
        )
    return table


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="PENDING, QUEUED, ..., DEAD")] = None,
    task: Annotated[str | None, typer.Option()] = None,
    page: Annotated[int, typer.Option(min=1)] = 1,
    page_size: Annotated[int, typer.Option(min=1, max=100)] = 20,
) -> None:
    """List jobs, newest first."""
    jm = _manager(ctx)
    try:
        jobs, total = jm.list(status=status, task=task, page=page, page_size=page_size)
    finally:
        jm.close()
    console.print(_job_table(jobs, f"jobs (page {page}, {total} in all)"))


@jobs_app.command("dead")
def jobs_dead(ctx: typer.Context, page: Annotated[int, typer.Option(min=1)] = 1) -> None:
    """The dead-letter queue: jobs that used up their attempts."""
    jobs_list(ctx, status="DEAD", task=None, page=page, page_size=50)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context, job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Everything recorded about one job, including its error and traceback."""
    import orjson

    jm = _manager(ctx)
    try:
        data = jm.get(job_id).to_dict()
    finally:
        jm.close()
    if as_json:
        typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table(title=f"job {job_id}", show_header=False)
    for key, value in data.items():
        table.add_row(key, "" if value is None else str(value))
    console.print(table)


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job_id: str) -> None:
    """Run a DEAD (or CANCELLED) job again with a fresh set of attempts."""
    jm = _manager(ctx)
    try:
        job = jm.retry(job_id)
    finally:
        jm.close()
    console.print(
        f"job {job.id} is {job.status.value} again (attempt {job.attempt} of {job.max_attempts})"
    )


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    job_id: str,
    terminate: Annotated[bool, typer.Option(help="Kill it if running")] = False,
) -> None:
    """Cancel a waiting job, or ask a running one to stop."""
    jm = _manager(ctx)
    try:
        job = jm.cancel(job_id, terminate=terminate)
    finally:
        jm.close()
    console.print(
        f"job {job.id}: {job.status.value}"
        + (" (stop requested)" if job.cancel_requested and not job.done else "")
    )


@app.command()
def reaper(ctx: typer.Context) -> None:
    """Run the job reaper alone (workers already run one; this is for API-only hosts)."""
    import importlib
    import time

    from tasklab.celery_app import TASK_MODULES
    from tasklab.database import make_engine
    from tasklab.jobs.publisher import Publisher
    from tasklab.jobs.recovery import Reaper

    settings = settings_of(ctx)
    # Its give-up hooks (and bundling) need the jobs' declarations, as a worker has them.
    for module in (*TASK_MODULES, *settings.imports):
        importlib.import_module(module)
    r = Reaper(settings, make_engine(settings), Publisher(settings))
    r.finish_old_cancels()
    while True:
        counts = r.tick()
        if any(counts.values()):
            console.print(f"reaper: {counts}")
        time.sleep(settings.reaper_interval_s)


def main(argv: list[str] | None = None) -> Any:
    from tasklab.processes import exit_on_sigterm

    exit_on_sigterm()
    from sqlalchemy.exc import DBAPIError

    try:
        return app(args=argv, standalone_mode=True)
    except TasklabError as e:
        err_console.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except DBAPIError as e:
        err_console.print(f"error: {_db_hint(e)}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _db_hint(e: Exception) -> str:
    text = str(getattr(e, "orig", e)).splitlines()[0]
    if "no such table" in text or "does not exist" in text:
        return f"{text}: the schema is missing or old; run `tasklab db upgrade`"
    return f"database error: {text}"
