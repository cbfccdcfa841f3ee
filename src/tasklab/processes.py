"""Process-tree hygiene shared by the embedded server and the supervisor."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from collections.abc import Callable
from types import FrameType

import psutil

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: ask the kernel to SIGTERM this child when its parent dies (Linux).

    The kernel ties this to the *thread* that started the child: start long-lived children
    from the main thread (or another thread that outlives them), never from a short-lived one.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def kill_tree(pid: int, *, timeout_s: float = 5.0) -> None:
    """SIGTERM a process and all its descendants, SIGKILL what is left after ``timeout_s``."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks and atexit handlers run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def on_stop_signals(callback: Callable[[int], None]) -> None:
    """Call ``callback(signum)`` on SIGINT and SIGTERM instead of raising."""

    def handler(signum: int, frame: FrameType | None) -> None:
        callback(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def pid_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


__all__ = ["die_with_parent", "exit_on_sigterm", "kill_tree", "on_stop_signals", "pid_alive"]
