"""The embedded/configured stack as one process tree (what ``tasklab up`` runs)."""

from __future__ import annotations

import importlib.util
from contextlib import ExitStack
from dataclasses import dataclass

from rich.console import Console

from tasklab.embedded import EmbeddedRedis
from tasklab.observe.multiproc import prepare_dir
from tasklab.processes import on_stop_signals
from tasklab.settings import Settings
from tasklab.supervisor import Component, Supervisor, child_env, tasklab_argv


@dataclass(frozen=True)
class StackOptions:
    host: str
    port: int
    api_workers: int
    concurrency: int
    beat: bool = True
    exporter_port: int = 0
    flower: bool = False


def embedded_env(settings: Settings, stack: ExitStack, console: Console) -> dict[str, str]:
    """Start what is not configured (Redis) and return the env that points children at it."""
    env: dict[str, str] = {"TASKLAB_HOME_DIR": str(settings.home_dir.resolve())}
    if settings.redis_url is None and settings.broker_url is None:
        server = EmbeddedRedis(settings.home_dir / "redis")
        url = server.start()
        stack.callback(server.stop)
        console.print(f"[red]  redis[/] | embedded redis-server pid {server.pid} at {url}")
        env["REDIS_URL"] = url
    return env


def components(opts: StackOptions, console: Console) -> list[Component]:
    comps = [
        Component("worker", tasklab_argv("worker", "--concurrency", str(opts.concurrency))),
        Component(
            "api",
            tasklab_argv(
                "api",
                "--host",
                opts.host,
                "--port",
                str(opts.port),
                "--workers",
                str(opts.api_workers),
            ),
        ),
    ]
    if opts.beat:
        comps.append(Component("beat", tasklab_argv("beat")))
    if opts.exporter_port:
        comps.append(
            Component(
                "exporter",
                tasklab_argv("exporter", "--port", str(opts.exporter_port), "--host", opts.host),
            )
        )
    if opts.flower:
        if importlib.util.find_spec("flower") is None:
            console.print("flower is not installed (pip install 'tasklab[flower]'); skipped")
        else:
            comps.append(Component("flower", tasklab_argv("flower")))
    return comps


def run_stack(settings: Settings, opts: StackOptions) -> None:
    from tasklab.migrations import migrate

    console = Console(stderr=True)
    migrate(settings)
    with ExitStack() as stack:
        # Every process writes metrics into one fresh multiprocess directory.
        env = child_env({**embedded_env(settings, stack, console), **prepare_dir(settings)})
        supervisor = Supervisor(components(opts, console), env=env, console=console)
        on_stop_signals(supervisor.request_stop)
        console.print(
            f"tasklab up: API on http://{opts.host}:{opts.port}"
            + (f", metrics exporter on :{opts.exporter_port}" if opts.exporter_port else "")
            + " — Ctrl-C stops everything"
        )
        supervisor.run()
    console.print("tasklab up: stopped")
