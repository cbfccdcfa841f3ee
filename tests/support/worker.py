"""A real Celery worker subprocess for tests: start, wait until it consumes, SIGKILL, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tasklab.celery_app import make_celery
from tasklab.processes import die_with_parent, kill_tree
from tasklab.settings import Settings, to_env


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLAB_")}
    for k in ("REDIS_URL", "BROKER_URL", "DATABASE_URL", "RESULT_BACKEND"):
        env.pop(k, None)
    env.update(to_env(settings))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class WorkerProcess:
    """``tasklab worker`` in a subprocess, logging to a file under the settings' home."""

    def __init__(
        self,
        settings: Settings,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: str = "",
        name: str = "w1",
    ) -> None:
        self.settings = settings
        self.name = name
        self.argv = [
            sys.executable,
            "-m",
            "tasklab",
            "worker",
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--hostname",
            f"{name}@%h",
        ]
        if queues:
            self.argv += ["--queues", queues]
        self.log_path = Path(settings.home_dir) / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_s: float = 60.0) -> WorkerProcess:
        self.spawn()
        self.wait_ready(wait_s)
        return self

    def spawn(self) -> WorkerProcess:
        """Start the process without waiting for it (``wait_ready``): workers spawned one
        after the other import at the same time."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env=child_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        log.close()
        return self

    def wait_ready(self, wait_s: float) -> None:
        app = make_celery(self.settings)
        deadline = time.monotonic() + wait_s
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"worker exited early:\n{self.log()}")
                # limit=1: back at the first reply, not at the end of the timeout (another
                # worker on the broker answering first only costs another round)
                replies = app.control.ping(timeout=0.5, limit=1) or []
                if any(self.name in next(iter(r)) for r in replies):
                    return
            raise TimeoutError(f"worker did not answer ping in {wait_s}s:\n{self.log()}")
        finally:
            app.close()

    def child_pids(self) -> list[int]:
        assert self.process is not None
        try:
            return [c.pid for c in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as a crash would."""
        if self.process is None:
            return
        pids = [self.process.pid, *self.child_pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        psutil.wait_procs([p for p in map(_proc, pids) if p], timeout=5)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            kill_tree(self.process.pid, timeout_s=10)
            self.process.wait()
            self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except FileNotFoundError:
            return ""


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None
