"""Operate a running stack from another command: detach it, stop it, restart its parts, read
its logs, list what runs. Everything goes through the stack's record and its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from tasklab.errors import NoStackRunning, StackError
from tasklab.processes import kill_tree, pid_alive
from tasklab.stack_record import (
    REQUESTS_FILE,
    HomeLock,
    StackRecord,
    log_dir,
    record_path,
    running_stack,
)
from tasklab.supervisor import GIVE_UP_MARK, tasklab_argv

Notice = Callable[[str], None]
Say = Callable[[str], None]
READY_TIMEOUT_S = 60.0  # beyond the start window: a cold start on a busy machine
STOP_TIMEOUT_S = 30.0  # the supervisor stops its parts within 10 s; then the tree is killed
RESTART_TIMEOUT_S = 60.0
TAIL_BYTES = 256_000


def require_stack(home_dir: Path, *, notice: Notice) -> StackRecord:
    record = running_stack(home_dir, notice=notice)
    if record is None:
        raise NoStackRunning(f"no stack runs in {home_dir} (`tasklab up --detach` starts one)")
    return record


# --- up --detach --------------------------------------------------------------------------------
def detach(
    home_dir: Path,
    up_args: list[str],
    *,
    start_window_s: float,
    notice: Notice,
    say: Say,
    err: Say,
) -> int:
    """Start ``tasklab up`` in the background with its output in ``<home>/logs``; wait until
    it is ready (``_wait_ready``). Return the exit code: 0, or the stack's own code when it
    stopped during its start (what it said then goes to ``err``)."""
    lock = HomeLock(home_dir)
    lock.acquire(notice=notice)  # one stack per home folder: say so before starting anything
    lock.release()
    running_stack(home_dir, notice=notice)  # reports (and drops) a record left by a dead stack
    out_path = log_dir(home_dir) / "stack.log"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    offset = out_path.stat().st_size if out_path.exists() else 0
    with out_path.open("ab") as out:
        proc = subprocess.Popen(
            tasklab_argv("up", *up_args, "--background"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # out of the terminal's process group: Ctrl-C, hangup
        )
    record = _wait_ready(proc, home_dir, start_window_s)
    output = _read_from(out_path, offset).splitlines()
    if record is None:
        code = proc.poll()
        # The reason the supervisor gave, else the end of what the stack said.
        reasons = [line for line in output if GIVE_UP_MARK in line]
        for line in reasons or output[-20:]:
            err(line)
        if code is None:
            err(
                f"the stack (pid {proc.pid}) is not ready after its start window and "
                f"{READY_TIMEOUT_S:.0f} s more; it runs on (`tasklab ps`, `tasklab logs`)"
            )
            return 1
        return code
    for line in output:
        if line.startswith(("notice:", "tasklab up:", "flower is not installed")):
            say(line)
    for name, part in record.parts.items():
        if part.restarts:
            say(f"note: {name} exited during the start (`tasklab logs {name}`)")
    say(
        f"stack pid {record.pid} runs in the background; logs in {log_dir(home_dir)} "
        "(`tasklab ps`, `tasklab logs [PART] --follow`, `tasklab stop`)"
    )
    return 0


def _wait_ready(
    proc: subprocess.Popen[bytes], home_dir: Path, start_window_s: float
) -> StackRecord | None:
    """The stack's record once its API answers and every part has run past the supervisor's
    start window (a part that fails at its start does so within it), else None."""
    deadline = time.monotonic() + start_window_s + READY_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        record = _own_record(home_dir, proc.pid)
        if (
            record
            and record.state == "running"
            and _settled(record, start_window_s)
            and _answers(record.api_url)
        ):
            return record
        time.sleep(0.2)
    return None


def _settled(record: StackRecord, start_window_s: float) -> bool:
    now = time.time()
    return all(
        part.state == "running" and now - part.started_at >= start_window_s
        for part in record.parts.values()
    )


def _own_record(home_dir: Path, pid: int) -> StackRecord | None:
    try:
        record = StackRecord.model_validate_json(record_path(home_dir).read_bytes())
    except (OSError, ValueError):
        return None
    return record if record.pid == pid else None


def _answers(api_url: str) -> bool:
    import httpx  # only here: every CLI command imports this module

    url = api_url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# --- stop, restart --------------------------------------------------------------------------------
def stop(home_dir: Path, *, notice: Notice, say: Say) -> None:
    record = require_stack(home_dir, notice=notice)
    t0 = time.monotonic()
    os.kill(record.pid, signal.SIGTERM)
    try:
        psutil.Process(record.pid).wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        say(f"the stack (pid {record.pid}) did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")
        kill_tree(record.pid)
    except psutil.NoSuchProcess:
        pass
    say(f"stopped the stack in {home_dir} ({record.describe()}) in {time.monotonic() - t0:.1f} s")


def restart(home_dir: Path, part: str | None, *, notice: Notice, say: Say) -> None:
    """Ask the supervisor to restart one part (all of them without ``part``), wait for it."""
    record = require_stack(home_dir, notice=notice)
    names = _restartable(record, part)
    if record.state != "running":
        raise StackError(f"the stack (pid {record.pid}) is {record.state}; try again in a moment")
    before = {name: record.parts[name].pid for name in names}
    with (home_dir / REQUESTS_FILE).open("a") as f:
        f.write(f"{part or '*'}\n")
    os.kill(record.pid, signal.SIGUSR1)
    after = _wait_restarted(home_dir, before)
    for name in names:
        say(f"restarted {name} (pid {before[name]} -> {after[name]})")


def _restartable(record: StackRecord, part: str | None) -> list[str]:
    parts = [name for name in record.parts if name != "redis"]
    if part is None:
        return parts
    if part == "redis":
        raise StackError(
            "the embedded Redis restarts with the stack only: `tasklab stop`, then `tasklab up`"
        )
    if part not in parts:
        raise StackError(f"no part named {part!r} in the stack; one of {', '.join(parts)}")
    return [part]


def _wait_restarted(home_dir: Path, before: dict[str, int | None]) -> dict[str, int | None]:
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        record = running_stack(home_dir, notice=lambda _: None)
        if record is None:
            raise StackError("the stack stopped while its parts restarted (see `tasklab logs`)")
        now = {name: record.parts[name].pid for name in before}
        if all(pid is not None and pid != before[name] for name, pid in now.items()):
            return now
        time.sleep(0.2)
    raise StackError(f"the parts did not restart in {RESTART_TIMEOUT_S:.0f} s (see `tasklab logs`)")


# --- logs ---------------------------------------------------------------------------------------
def log_file(home_dir: Path, part: str | None) -> Path:
    """``<home>/logs/stack.log`` (every part, prefixed), a part's own log, or Redis's."""
    if part == "redis":
        path = home_dir / "redis" / "redis.log"
    else:
        path = log_dir(home_dir) / f"{part or 'stack'}.log"
    if not path.is_file():
        known = sorted(p.stem for p in log_dir(home_dir).glob("*.log") if p.stem != "stack")
        raise StackError(
            f"no log {path}"
            + (f"; parts with logs: {', '.join(known)}" if known else "; has a stack run here?")
        )
    return path


def tail(path: Path, lines: int) -> tuple[list[str], int]:
    """The last ``lines`` lines and the offset where new ones will start."""
    size = path.stat().st_size
    start = max(0, size - TAIL_BYTES)
    text = _read_from(path, start)
    if start:
        text = text.split("\n", 1)[-1]  # drop the cut first line
    return (text.splitlines()[-lines:] if lines else []), size


def follow(path: Path, offset: int, *, poll_s: float = 0.2) -> Iterator[str]:
    """Lines written to ``path`` after ``offset``, as they come (a log rotated at the
    stack's next start is followed from its beginning)."""
    pending = ""
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size < offset:
            offset, pending = 0, ""
        if size > offset:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *complete, pending = (pending + chunk.decode(errors="replace")).split("\n")
            yield from complete
        else:
            time.sleep(poll_s)


# --- ps -------------------------------------------------------------------------------------------
def ps_rows(record: StackRecord) -> list[dict[str, Any]]:
    now = time.time()
    rows = []
    for name, part in record.parts.items():
        state = part.state
        if state == "running" and (part.pid is None or not pid_alive(part.pid)):
            state = "exited"
        up_s = now - part.started_at if state == "running" and part.started_at else None
        rows.append(
            {
                "part": name,
                "state": state,
                "pid": part.pid,
                "port": part.port,
                "uptime_s": None if up_s is None else round(up_s, 1),
                "restarts": part.restarts,
            }
        )
    return rows


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def stack_summary(record: StackRecord) -> str:
    mode = "detached" if record.detached else "in the foreground"
    up = duration(time.time() - record.started_at)
    return (
        f"stack pid {record.pid} in {record.home_dir} ({mode}), up {up}"
        f"; API on {record.api_url}; logs in {Path(record.home_dir) / 'logs'}"
    )


__all__ = [
    "detach",
    "duration",
    "follow",
    "log_file",
    "ps_rows",
    "require_stack",
    "restart",
    "stack_summary",
    "stop",
    "tail",
]
