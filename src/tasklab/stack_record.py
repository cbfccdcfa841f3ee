"""The running stack's record in its home folder: how other commands find ``tasklab up``.

``tasklab up`` holds ``<home>/stack.lock`` (an ``flock``, released by the kernel even on SIGKILL)
for its whole life and keeps ``<home>/stack.json`` up to date: its pid, where the embedded Redis
listens, the ports and the parts. A record whose process is gone is ignored with a notice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil
from pydantic import BaseModel, ValidationError

from tasklab.errors import StackRunning
from tasklab.settings import Settings

RECORD_FILE = "stack.json"
LOCK_FILE = "stack.lock"
REQUESTS_FILE = "stack.requests"
LOG_DIR = "logs"
LOCK_RETRY_S = 1.0  # a reader that peeks at the lock holds it for an instant: retry that long


class PartRecord(BaseModel):
    pid: int | None = None
    started_at: float = 0.0  # epoch seconds of its last start
    restarts: int = 0  # restarts after it died (requested restarts are not counted)
    state: str = "starting"  # running, waiting (to restart), gave up, stopped
    port: int | None = None


class StackRecord(BaseModel):
    pid: int
    create_time: float  # with the pid, names one process (pids are reused)
    home_dir: str
    started_at: float
    state: str = "starting"  # running, stopping
    detached: bool = False
    api_url: str = ""
    redis_url: str | None = None  # the embedded Redis; None when the stack uses a configured one
    ports: dict[str, int] = {}
    parts: dict[str, PartRecord] = {}

    def is_alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            same = abs(float(proc.create_time()) - self.create_time) < 1.0
            return same and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def describe(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.started_at))
        where = f", API on {self.api_url}" if self.api_url else ""
        return f"pid {self.pid}{where}, up since {since}"


def record_path(home_dir: Path) -> Path:
    return home_dir / RECORD_FILE


def log_dir(home_dir: Path) -> Path:
    return home_dir / LOG_DIR


def write_record(record: StackRecord, home_dir: Path) -> None:
    """Replace the record atomically: a reader sees the old one or the new one, never half."""
    path = record_path(home_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    os.replace(tmp, path)


def remove_record(home_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(home_dir).unlink()


Notice = Callable[[str], None]


def running_stack(home_dir: Path, *, notice: Notice) -> StackRecord | None:
    """The stack that runs with this home folder, or None. A record left by a stack that is
    gone (killed, crashed) is reported through ``notice`` once and removed."""
    path = record_path(home_dir)
    try:
        record = StackRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError):
        notice(f"{path} is not a stack record; ignoring it")
        return None
    if record.is_alive():
        return record
    notice(f"the stack recorded in {path} (pid {record.pid}) is gone; ignoring its record")
    _remove_if_unlocked(home_dir)
    return None


def _remove_if_unlocked(home_dir: Path) -> None:
    # Only while nobody holds the lock: a new `up` may be writing its record right now.
    with contextlib.suppress(OSError), (home_dir / LOCK_FILE).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        remove_record(home_dir)


def attach_running_stack(settings: Settings, *, notice: Notice) -> Settings:
    """Point commands without a broker URL at the embedded Redis of the stack in their home."""
    if settings.redis_url or settings.broker_url:
        return settings
    record = running_stack(settings.home_dir, notice=notice)
    if record is None or record.redis_url is None:
        return settings
    return settings.model_copy(update={"redis_url": record.redis_url})


class HomeLock:
    """One stack per home folder: held by ``tasklab up`` from start to end."""

    def __init__(self, home_dir: Path) -> None:
        self.home_dir = home_dir
        self._file: IO[str] | None = None

    def acquire(self, *, notice: Notice) -> None:
        self.home_dir.mkdir(parents=True, exist_ok=True)
        f = (self.home_dir / LOCK_FILE).open("a")
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.close()
                    raise self._running_error(notice) from None
                time.sleep(0.05)
        self._file = f

    def _running_error(self, notice: Notice) -> StackRunning:
        record = running_stack(self.home_dir, notice=notice)
        what = record.describe() if record else "starting or stopping"
        return StackRunning(
            f"a stack already runs in {self.home_dir} ({what}); `tasklab stop` stops it, "
            "or use another TASKLAB_HOME_DIR"
        )

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()


__all__ = [
    "HomeLock",
    "PartRecord",
    "StackRecord",
    "attach_running_stack",
    "log_dir",
    "record_path",
    "remove_record",
    "running_stack",
    "write_record",
]
