"""Ports for the stack's servers: the user's choice, else a default that gives way when taken.

Stacks that start at the same moment on one machine would see the same default free and both
take it. ``MachinePortLock`` (an ``flock`` in the temp folder) makes them choose one after the
other: a stack holds it from its choice until its parts listen.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tasklab.errors import PortTaken

LOCK_WAIT_S = 60.0  # a holder lets go once its parts listen, BIND_WAIT_S at the most
BIND_WAIT_S = 30.0


@dataclass(frozen=True)
class PortWish:
    """A port to listen on: the user's choice (``chosen_by`` names where they made it) or a
    default that gives way to a free port when taken."""

    port: int
    chosen_by: str | None = None


def port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as uvicorn and http.server set it: a TIME_WAIT leftover is no conflict.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def take_port(host: str, name: str, wish: PortWish, notes: list[str]) -> int:
    """The port ``name`` will listen on; raise PortTaken for a chosen port that is in use.
    A default that is taken is replaced by a free port, and ``notes`` says so."""
    if not wish.port:
        return free_port_on(host)
    if port_is_free(host, wish.port):
        return wish.port
    if wish.chosen_by is not None:
        raise PortTaken(
            f"port {wish.port} on {host} ({wish.chosen_by}, for the {name}) is in use; "
            "choose another, or leave it out to take a free one"
        )
    port = free_port_on(host)
    notes.append(f"{name} port {wish.port} is in use, took {port}")
    return port


def listens(host: str, port: int) -> bool:
    """Something accepts connections there (a connect, not a bind: a bind would steal it)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    with contextlib.suppress(OSError), socket.create_connection((target, port), timeout=0.5):
        return True
    return False


class MachinePortLock:
    """Held by a starting stack from its choice of ports until its parts listen on them."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or Path(tempfile.gettempdir()) / "tasklab-ports.lock"
        self._file: IO[str] | None = None
        self._guard = threading.Lock()

    def acquire(self) -> None:
        try:
            f = self.path.open("a")
        except OSError:  # another user's lock file: their stacks' ports show as taken anyway
            return
        deadline = time.monotonic() + LOCK_WAIT_S
        while time.monotonic() < deadline:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        # Past the deadline the holder is stuck: go on unlocked rather than wait for ever.
        self._file = f

    def release(self) -> None:
        with self._guard:
            f, self._file = self._file, None
        if f is not None:
            f.close()

    def release_when_listening(self, host: str, ports: list[int], stop: threading.Event) -> None:
        """Let go (in a thread) once every port listens, or after BIND_WAIT_S, or on ``stop``."""

        def wait() -> None:
            deadline = time.monotonic() + BIND_WAIT_S
            pending = list(ports)
            while pending and time.monotonic() < deadline and not stop.is_set():
                pending = [p for p in pending if not listens(host, p)]
                time.sleep(0.1)
            self.release()

        threading.Thread(target=wait, name="tasklab-port-lock", daemon=True).start()


__all__ = [
    "MachinePortLock",
    "PortWish",
    "free_port_on",
    "listens",
    "port_is_free",
    "take_port",
]
