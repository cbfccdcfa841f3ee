"""``tasklab up``: run the stack as one process tree, restart what dies, stop it all on Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console
from rich.markup import escape

from tasklab.processes import die_with_parent, kill_tree

BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a component that ran this long gets its restart backoff reset
STOP_GRACE_S = 7.0  # SIGTERM, then SIGKILL after this: total stop stays under 10 s
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
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start_at: float = 0.0
    backoff_s: float = 1.0
    readers: list[threading.Thread] = field(default_factory=list)


class Supervisor:
    def __init__(
        self, components: list[Component], *, env: dict[str, str], console: Console | None = None
    ) -> None:
        self.components = components
        self.env = env
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()

    def log(self, name: str, line: str) -> None:
        color = _COLORS.get(name, "white")
        self.console.print(f"[{color}]{name:>7}[/] | {escape(line)}", highlight=False)

    def start(self, comp: Component) -> None:
        comp.process = subprocess.Popen(
            comp.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        comp.started_at = time.monotonic()
        assert comp.process.stdout is not None
        reader = threading.Thread(
            target=self._pump, args=(comp.name, comp.process.stdout), daemon=True
        )
        reader.start()
        comp.readers = [reader]
        self.log(comp.name, f"started (pid {comp.process.pid})")

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.log(name, raw.decode(errors="replace").rstrip())
        stream.close()

    def check(self, comp: Component) -> None:
        """Restart a component that exited, with exponential backoff."""
        now = time.monotonic()
        if comp.process is None:
            if now >= comp.next_start_at:
                self.start(comp)
            return
        code = comp.process.poll()
        if code is None:
            if now - comp.started_at > HEALTHY_AFTER_S:
                comp.backoff_s = 1.0
            return
        comp.process = None
        comp.restarts += 1
        comp.next_start_at = now + comp.backoff_s
        self.log(
            comp.name,
            f"exited with code {code}; restart #{comp.restarts} in {comp.backoff_s:.0f} s",
        )
        comp.backoff_s = min(comp.backoff_s * 2, BACKOFF_MAX_S)

    def request_stop(self, _signum: int = 0) -> None:
        self._stop.set()

    def run(self) -> None:
        for comp in self.components:
            self.start(comp)
        try:
            while not self._stop.wait(0.2):
                for comp in self.components:
                    self.check(comp)
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        for comp in self.components:
            if comp.process and comp.process.poll() is None:
                self.log(comp.name, "stopping")
        threads = [threading.Thread(target=self._stop_one, args=(c,)) for c in self.components]
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


def tasklab_argv(*args: str) -> list[str]:
    """Run a tasklab subcommand with the same interpreter."""
    return [sys.executable, "-m", "tasklab", *args]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env
