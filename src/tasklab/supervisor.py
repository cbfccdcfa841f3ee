"""``tasklab up``: run the stack as one process tree, restart what dies, stop it all on Ctrl-C.

A part that dies after it ran a while is restarted with backoff. A part that keeps dying right
after its start (``start_limit`` times in a row within ``start_window_s`` of a start, as
systemd's StartLimitBurst) will not start by retrying: the supervisor says why once and stops.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape

from tasklab.processes import die_with_parent, kill_tree

BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a component that ran this long gets its restart backoff reset
STOP_GRACE_S = 7.0  # SIGTERM, then SIGKILL after this: total stop stays under 10 s
START_LIMIT = 3  # failures in a row, each within START_WINDOW_S of its start: give up
START_WINDOW_S = 10.0
GIVE_UP_MARK = "not restarting it, stopping the stack"
LOG_ROTATE_BYTES = 20_000_000  # a log file above this at start is moved to <name>.log.1
_ERROR_WORDS = re.compile(r"error|exception|denied|in use|not found|no such|cannot", re.I)
_COLORS = {
    "redis": "red",
    "worker": "cyan",
    "beat": "magenta",
    "api": "green",
    "flower": "yellow",
    "reaper": "blue",
}


@dataclass
class Component:
    name: str
    argv: list[str]
    port: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # monotonic
    started_wall: float = 0.0  # epoch, for uptimes shown to people
    restarts: int = 0
    early_failures: int = 0
    next_start_at: float = 0.0
    backoff_s: float = 1.0
    state: str = "starting"
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    readers: list[threading.Thread] = field(default_factory=list)


class PartLogs:
    """``<dir>/<part>.log`` per part (its raw lines) and ``<dir>/stack.log`` (all, prefixed)."""

    def __init__(self, directory: Path, names: list[str], *, combined: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._files = {name: _open_log(directory / f"{name}.log") for name in names}
        self._combined = _open_log(directory / "stack.log") if combined else None
        self._lock = threading.Lock()

    def write(self, name: str, line: str) -> None:
        with self._lock:
            if name in self._files:
                self._files[name].write(line + "\n")
            if self._combined is not None:
                self._combined.write(f"{time.strftime('%H:%M:%S')} {name:>8} | {line}\n")

    def close(self) -> None:
        for f in [*self._files.values(), self._combined]:
            if f is not None:
                f.close()


def _open_log(path: Path) -> IO[str]:
    if path.exists() and path.stat().st_size > LOG_ROTATE_BYTES:
        path.replace(path.with_suffix(".log.1"))
    return path.open("a", buffering=1, encoding="utf-8", errors="replace")


class Supervisor:
    def __init__(
        self,
        components: list[Component],
        *,
        env: dict[str, str],
        console: Console | None = None,
        logs: PartLogs | None = None,
        on_change: Callable[[], None] | None = None,
        start_limit: int = START_LIMIT,
        start_window_s: float = START_WINDOW_S,
    ) -> None:
        self.components = components
        self.env = env
        self.console = console
        self.logs = logs
        self.on_change = on_change or (lambda: None)
        self.start_limit = start_limit
        self.start_window_s = start_window_s
        self.gave_up: str | None = None  # why the stack stopped on its own, if it did
        self._stop = threading.Event()
        self._requests: deque[str] = deque()

    def log(self, name: str, line: str) -> None:
        if self.logs is not None:
            self.logs.write(name, line)
        if self.console is not None:
            color = _COLORS.get(name, "white")
            self.console.print(
                f"[{color}]{name:>7}[/] | {escape(line)}", highlight=False, soft_wrap=True
            )

    def start(self, comp: Component) -> None:
        comp.process = subprocess.Popen(
            comp.argv,
            env={**self.env, **comp.env} if comp.env else self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        comp.started_at = time.monotonic()
        comp.started_wall = time.time()
        comp.state = "running"
        assert comp.process.stdout is not None
        reader = threading.Thread(target=self._pump, args=(comp, comp.process.stdout), daemon=True)
        reader.start()
        comp.readers = [reader]
        self.log(comp.name, f"started (pid {comp.process.pid})")
        self.on_change()

    def _pump(self, comp: Component, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            comp.last_lines.append(line)
            self.log(comp.name, line)
        stream.close()

    def check(self, comp: Component) -> None:
        """Restart a component that exited, with exponential backoff; give up on one that
        keeps failing right after its start."""
        now = time.monotonic()
        if comp.process is None:
            if comp.state == "waiting" and now >= comp.next_start_at:
                self.start(comp)
            return
        code = comp.process.poll()
        if code is None:
            if now - comp.started_at > self.start_window_s:
                comp.early_failures = 0
            if now - comp.started_at > HEALTHY_AFTER_S:
                comp.backoff_s = 1.0
            return
        self._exited(comp, code, ran_s=now - comp.started_at)

    def _exited(self, comp: Component, code: int, *, ran_s: float) -> None:
        for reader in comp.readers:
            reader.join(timeout=1)  # its last lines say why it stopped
        comp.process = None
        comp.early_failures = comp.early_failures + 1 if ran_s <= self.start_window_s else 0
        if comp.early_failures >= self.start_limit:
            comp.state = "gave up"
            last = _telling_line(comp.last_lines)
            self.gave_up = (
                f"{comp.name} exited {comp.early_failures} times within "
                f"{self.start_window_s:.0f} s of its start (last exit code {code}"
                + (f": {last.strip()[:200]}" if last else "")
                + f"); {GIVE_UP_MARK}"
            )
            self.log(comp.name, self.gave_up)
            self.on_change()
            self._stop.set()
            return
        comp.restarts += 1
        comp.state = "waiting"
        comp.next_start_at = time.monotonic() + comp.backoff_s
        self.log(
            comp.name,
            f"exited with code {code}; restart #{comp.restarts} in {comp.backoff_s:.0f} s",
        )
        comp.backoff_s = min(comp.backoff_s * 2, BACKOFF_MAX_S)
        self.on_change()

    @property
    def stopping(self) -> threading.Event:
        """Set once the supervisor stops (asked to, or given up)."""
        return self._stop

    def request_stop(self, _signum: int = 0) -> None:
        self._stop.set()

    def request_restart(self, names: list[str]) -> None:
        """Restart these parts now (all of them for an empty list); safe from signal handlers."""
        self._requests.extend(names or [c.name for c in self.components])

    def run(self) -> None:
        for comp in self.components:
            self.start(comp)
        try:
            while not self._stop.wait(0.2):
                self._serve_requests()
                for comp in self.components:
                    if not self._stop.is_set():
                        self.check(comp)
        finally:
            self.stop_all()

    def _serve_requests(self) -> None:
        names: set[str] = set()
        while self._requests:
            names.add(self._requests.popleft())
        chosen = [c for c in self.components if c.name in names]
        if not chosen:
            return
        for comp in chosen:
            self.log(comp.name, "restart requested")
        self._stop_many(chosen)
        for comp in chosen:
            comp.early_failures, comp.backoff_s = 0, 1.0
            self.start(comp)

    def stop_all(self) -> None:
        for comp in self.components:
            if comp.process and comp.process.poll() is None:
                self.log(comp.name, "stopping")
        self._stop_many(self.components)
        for comp in self.components:
            if comp.state != "gave up":
                comp.state = "stopped"

    def _stop_many(self, comps: list[Component]) -> None:
        threads = [threading.Thread(target=self._stop_one, args=(c,)) for c in comps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _stop_one(self, comp: Component) -> None:
        proc, comp.process = comp.process, None
        if proc is None:
            return
        kill_tree(proc.pid, timeout_s=STOP_GRACE_S)
        proc.wait()
        for reader in comp.readers:
            reader.join(timeout=1)


def _telling_line(lines: deque[str]) -> str:
    """The line that most likely says why a part stopped: its last error, else its last line."""
    texts = [line.strip() for line in lines if line.strip()]
    errors = [t for t in texts if _ERROR_WORDS.search(t)]
    return (errors or texts or [""])[-1]


def tasklab_argv(*args: str) -> list[str]:
    """Run a tasklab subcommand with the same interpreter."""
    return [sys.executable, "-m", "tasklab", *args]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env
