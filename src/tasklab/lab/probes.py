"""Probe tasks the lab measures with. Add ``tasklab.lab.probes`` to a worker's imports to use
the lab against your own Celery app; the tasks bind to whichever app is current."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from celery import shared_task

from tasklab.lab.bookkeeping import count_done


@shared_task(name="tasklab.probe.noop")
def noop(sent_at: float | None = None) -> dict[str, Any]:
    """Do nothing; report when it ran so the caller can split queue wait from run time."""
    return {
        "sent_at": sent_at,
        "started_at": time.time(),
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


@shared_task(name="tasklab.probe.noop_untracked", track_started=False)
def noop_untracked(sent_at: float | None = None) -> dict[str, Any]:
    """``noop`` without a STARTED state written to the result backend: raw Celery on the
    terms tasklab's jobs run on (bench's jobs baseline)."""
    return {
        "sent_at": sent_at,
        "started_at": time.time(),
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


@shared_task(name="tasklab.probe.counted_untracked", track_started=False, bind=True)
def counted_untracked(self: Any, sent_at: float | None = None) -> dict[str, Any]:
    """``noop_untracked`` plus the shared harness's bookkeeping (one Redis round trip): the
    bench's raw Celery path."""
    started = time.time()
    count_done(str(self.app.conf.broker_url))
    return {
        "sent_at": sent_at,
        "started_at": started,
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


@shared_task(name="tasklab.probe.sleep")
def sleep(seconds: float, sent_at: float | None = None) -> dict[str, Any]:
    """I/O-bound stand-in: waits without using CPU."""
    started = time.time()
    time.sleep(seconds)
    return {
        "sent_at": sent_at,
        "started_at": started,
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


@shared_task(name="tasklab.probe.cpu")
def cpu(rounds: int = 20_000, sent_at: float | None = None) -> dict[str, Any]:
    """CPU-bound stand-in: repeated hashing."""
    started = time.time()
    digest = b"tasklab"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {
        "sent_at": sent_at,
        "started_at": started,
        "finished_at": time.time(),
        "pid": os.getpid(),
        "digest": digest.hex()[:8],
    }


@shared_task(name="tasklab.probe.mixed")
def mixed(
    rounds: int = 5_000, seconds: float = 0.01, sent_at: float | None = None
) -> dict[str, Any]:
    """Half hashing, half waiting."""
    started = time.time()
    cpu.run(rounds)
    time.sleep(seconds)
    return {
        "sent_at": sent_at,
        "started_at": started,
        "finished_at": time.time(),
        "pid": os.getpid(),
    }


class ProbeFailure(RuntimeError):
    """Raised on purpose by the ``fail`` probe."""


@shared_task(name="tasklab.probe.fail")
def fail(message: str = "probe failure") -> None:
    raise ProbeFailure(message)
