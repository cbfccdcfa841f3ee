"""The embedded/configured stack as one process tree (what ``tasklab up`` runs)."""

from __future__ import annotations

from contextlib import ExitStack

from rich.console import Console

from tasklab.embedded import EmbeddedRedis
from tasklab.processes import on_stop_signals
from tasklab.settings import Settings
from tasklab.supervisor import Component, Supervisor, child_env, tasklab_argv


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


def run_stack(settings: Settings, *, host: str, port: int, api_workers: int,
              concurrency: int, beat: bool = True) -> None:
    from tasklab.migrations import migrate

    console = Console(stderr=True)
    migrate(settings)
    with ExitStack() as stack:
        env = child_env(embedded_env(settings, stack, console))
        components = [
            Component("worker", tasklab_argv("worker", "--concurrency", str(concurrency))),
            Component("api", tasklab_argv("api", "--host", host, "--port", str(port),
                                          "--workers", str(api_workers))),
        ]
        if beat:
            components.append(Component("beat", tasklab_argv("beat")))
        supervisor = Supervisor(components, env=env, console=console)
        on_stop_signals(supervisor.request_stop)
        console.print(f"tasklab up: API on http://{host}:{port} — Ctrl-C stops everything")
        supervisor.run()
    console.print("tasklab up: stopped")
