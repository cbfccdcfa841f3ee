"""The embedded/configured stack as one process tree (what ``tasklab up`` runs).

One stack per home folder (``HomeLock``); its record (``tasklab.stack_record``) tells the other
commands where it listens. Ports the user did not choose are the defaults when free, else free
ones; a port the user chose that is taken stops ``up`` before anything starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil
from rich.console import Console

from tasklab.embedded import EmbeddedRedis
from tasklab.observe.multiproc import prepare_dir
from tasklab.ports import MachinePortLock, PortWish, take_port
from tasklab.processes import on_stop_signals
from tasklab.settings import Settings
from tasklab.stack_record import (
    REQUESTS_FILE,
    HomeLock,
    PartRecord,
    StackRecord,
    log_dir,
    remove_record,
    running_stack,
    write_record,
)
from tasklab.supervisor import Component, PartLogs, Supervisor, child_env, tasklab_argv

FLOWER_PORT = 5555


@dataclass(frozen=True)
class StackOptions:
    host: str
    api: PortWish
    api_workers: int
    concurrency: int
    beat: bool = True
    exporter: PortWish | None = None  # None: no exporter
    flower: PortWish | None = None  # None: no Flower
    background: bool = False  # detached: output goes to the log files only
    # worker nodes: one is the stack's "worker"; more are "worker1".."workerN", each with its
    # own node name, home folder and metrics port, sharing only the broker and the database
    nodes: int = 1


def stack_options(
    settings: Settings,
    *,
    host: str | None,
    port: int | None,
    workers: int | None,
    concurrency: int | None,
    beat: bool,
    exporter_port: int | None,
    flower: bool,
    background: bool = False,
    nodes: int = 1,
) -> StackOptions:
    """What ``tasklab up`` was asked for: options win over settings, both count as chosen."""

    def wish(option: int | None, name: str, field: str) -> PortWish:
        if option is not None:
            return PortWish(option, name)
        value = int(getattr(settings, field))
        chosen = f"setting {field}" if field in settings.model_fields_set else None
        return PortWish(value, chosen)

    exporter_on = (exporter_port if exporter_port is not None else settings.exporter_port) != 0
    return StackOptions(
        host=host or settings.api_host,
        api=wish(port, "--port", "api_port"),
        api_workers=workers or settings.api_workers,
        concurrency=concurrency or settings.effective_concurrency,
        beat=beat,
        exporter=wish(exporter_port, "--exporter-port", "exporter_port") if exporter_on else None,
        flower=PortWish(FLOWER_PORT) if flower else None,
        background=background,
        nodes=nodes,
    )


def embedded_redis(settings: Settings, stack: ExitStack, console: Console) -> EmbeddedRedis | None:
    """Start Redis when no broker URL is configured."""
    if settings.redis_url is not None or settings.broker_url is not None:
        return None
    server = EmbeddedRedis(settings.home_dir / "redis")
    url = server.start()
    stack.callback(server.stop)
    console.print(f"[red]  redis[/] | embedded redis-server pid {server.pid} at {url}")
    return server


def components(
    opts: StackOptions, ports: dict[str, int], settings: Settings | None = None
) -> list[Component]:
    api_argv = ["api", "--host", opts.host, "--port", str(ports["api"])]
    comps = [
        *worker_nodes(opts, ports, settings),
        Component(
            "api",
            tasklab_argv(*api_argv, "--workers", str(opts.api_workers)),
            port=ports["api"],
        ),
    ]
    if opts.beat:
        comps.append(Component("beat", tasklab_argv("beat")))
    if "exporter" in ports:
        argv = tasklab_argv("exporter", "--port", str(ports["exporter"]), "--host", opts.host)
        comps.append(Component("exporter", argv, port=ports["exporter"]))
    if "flower" in ports:
        argv = tasklab_argv("flower", "--port", str(ports["flower"]))
        comps.append(Component("flower", argv, port=ports["flower"]))
    return comps


def worker_nodes(
    opts: StackOptions, ports: dict[str, int], settings: Settings | None
) -> list[Component]:
    """One worker whose metrics the API serves (the stack's one multiprocess folder), or
    ``opts.nodes`` workers that stand for separate machines: each its own node name, home
    folder (its metrics folder, its logs) and metrics port; the database and the broker
    shared (an embedded SQLite by its path, since it lives in the stack's home)."""
    concurrency = str(opts.concurrency)
    if opts.nodes == 1 or settings is None:
        argv = tasklab_argv("worker", "--concurrency", concurrency, "--metrics-port", "0")
        return [Component("worker", argv)]
    shared = {}
    if settings.database_url is None:
        shared["DATABASE_URL"] = f"sqlite:///{settings.sqlite_path.resolve()}"
    nodes = []
    for i in range(1, opts.nodes + 1):
        name = f"worker{i}"
        home = (settings.home_dir / "nodes" / name).resolve()
        argv = tasklab_argv(
            "worker",
            "--concurrency",
            concurrency,
            "--hostname",
            f"{name}@%h",
            "--metrics-port",
            str(ports[name]),
            "--metrics-host",
            opts.host,
        )
        env = {**shared, "TASKLAB_HOME_DIR": str(home), **node_metrics_env(settings, home)}
        nodes.append(Component(name, argv, port=ports[name], env=env))
    return nodes


def node_metrics_env(settings: Settings, home: Path) -> dict[str, str]:
    """A node's own, fresh multiprocess folder (the stack's belongs to the API)."""
    return prepare_dir(settings.model_copy(update={"home_dir": home}))


def plan_ports(opts: StackOptions, console: Console) -> tuple[dict[str, int], list[str]]:
    notes: list[str] = []
    ports = {"api": take_port(opts.host, "API", opts.api, notes)}
    if opts.nodes > 1:  # each node's /metrics: free ports, never a default
        for i in range(1, opts.nodes + 1):
            ports[f"worker{i}"] = take_port(opts.host, f"worker{i} metrics", PortWish(0), notes)
    if opts.exporter is not None:
        ports["exporter"] = take_port(opts.host, "exporter", opts.exporter, notes)
    if opts.flower is not None:
        if importlib.util.find_spec("flower") is None:
            console.print("flower is not installed (pip install 'tasklab[flower]'); skipped")
        else:
            ports["flower"] = take_port(opts.host, "Flower", opts.flower, notes)
    return ports, notes


class StackRecorder:
    """Keeps ``<home>/stack.json`` in step with the supervisor's parts."""

    def __init__(self, home_dir: Path, opts: StackOptions, ports: dict[str, int]) -> None:
        self.home_dir = home_dir
        me = psutil.Process()
        self.record = StackRecord(
            pid=me.pid,
            create_time=me.create_time(),
            home_dir=str(home_dir.resolve()),
            started_at=time.time(),
            detached=opts.background,
            api_url=f"http://{opts.host}:{ports['api']}",
            ports=dict(ports),
        )
        self.supervisor: Supervisor | None = None
        write_record(self.record, home_dir)

    def add_redis(self, server: EmbeddedRedis) -> None:
        self.record.redis_url = server.url
        self.record.ports["redis"] = server.port or 0
        self.record.parts["redis"] = PartRecord(
            pid=server.pid, started_at=time.time(), state="running", port=server.port
        )
        write_record(self.record, self.home_dir)

    def update(self, state: str | None = None) -> None:
        if state is not None:
            self.record.state = state
        for comp in self.supervisor.components if self.supervisor else []:
            self.record.parts[comp.name] = PartRecord(
                pid=comp.process.pid if comp.process else None,
                started_at=comp.started_wall,
                restarts=comp.restarts,
                state=comp.state,
                port=comp.port,
            )
        write_record(self.record, self.home_dir)


def _on_restart_requests(home_dir: Path, supervisor: Supervisor) -> None:
    """SIGUSR1: `tasklab restart` wrote the parts to restart into <home>/stack.requests."""

    def handler(signum: int, frame: FrameType | None) -> None:
        path = home_dir / REQUESTS_FILE
        with contextlib.suppress(FileNotFoundError):
            taken = path.with_suffix(".taken")
            os.replace(path, taken)
            names = taken.read_text().split()
            taken.unlink()
            supervisor.request_restart([] if "*" in names else names)

    signal.signal(signal.SIGUSR1, handler)


def notice_printer(console: Console) -> Callable[[str], None]:
    def notice(text: str) -> None:
        console.print(f"notice: {text}", highlight=False, soft_wrap=True)

    return notice


def run_stack(settings: Settings, opts: StackOptions) -> str | None:
    """Run the stack until a stop signal; return why it stopped on its own, if it did."""
    console = Console(stderr=True, soft_wrap=True)
    notice = notice_printer(console)
    lock = HomeLock(settings.home_dir)
    lock.acquire(notice=notice)
    try:
        running_stack(settings.home_dir, notice=notice)  # reports a record left by a dead stack
        return _run_locked(settings, opts, console)
    finally:
        remove_record(settings.home_dir)
        lock.release()


def _run_locked(settings: Settings, opts: StackOptions, console: Console) -> str | None:
    from tasklab.migrations import migrate

    port_lock = MachinePortLock()
    port_lock.acquire()
    with ExitStack() as stack:
        stack.callback(port_lock.release)
        ports, notes = plan_ports(opts, console)
        recorder = StackRecorder(settings.home_dir, opts, ports)
        migrate(settings)
        server = embedded_redis(settings, stack, console)
        extra = {"TASKLAB_HOME_DIR": str(settings.home_dir.resolve())}
        if server is not None:
            extra["REDIS_URL"] = server.url
            recorder.add_redis(server)
        # Every process writes metrics into one fresh multiprocess directory.
        env = child_env({**extra, **prepare_dir(settings)})
        comps = components(opts, ports, settings)
        logs = PartLogs(log_dir(settings.home_dir), [c.name for c in comps], combined=True)
        stack.callback(logs.close)
        supervisor = Supervisor(
            comps,
            env=env,
            console=None if opts.background else console,
            logs=logs,
            on_change=recorder.update,
            start_limit=settings.supervisor_start_limit,
            start_window_s=settings.supervisor_start_window_s,
        )
        recorder.supervisor = supervisor
        on_stop_signals(supervisor.request_stop)
        port_lock.release_when_listening(opts.host, list(ports.values()), supervisor.stopping)
        _on_restart_requests(settings.home_dir, supervisor)
        console.print(_banner(opts, ports, notes), highlight=False)
        recorder.update("running")
        supervisor.run()
        recorder.update("stopping")
    console.print("tasklab up: stopped")
    return supervisor.gave_up


def _banner(opts: StackOptions, ports: dict[str, int], notes: list[str]) -> str:
    api = f"http://{opts.host}:{ports['api']}"
    text = f"tasklab up: API on {api}, console on {api}/console"
    if "exporter" in ports:
        text += f", metrics exporter on :{ports['exporter']}"
    if "flower" in ports:
        text += f", Flower on :{ports['flower']}"
    if notes:
        text += f" ({'; '.join(notes)})"
    how = "`tasklab stop`" if opts.background else "Ctrl-C"
    return f"{text} — {how} stops everything"
