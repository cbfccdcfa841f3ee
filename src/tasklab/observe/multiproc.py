"""Prometheus multiprocess mode: one directory of mmap files shared by every tasklab process.

Why: uvicorn runs several API workers and Celery forks pool children; each is its own process
with its own counters. prometheus_client aggregates them when every process writes its values
under ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` reads them all (``MultiProcessCollector``).

Ordering matters. prometheus_client picks its value class **once, when ``prometheus_client``
is first imported** (``prometheus_client.values.ValueClass``): if the variable is not in the
environment at that moment, the process keeps plain in-memory values for good. So:

* the parent (``tasklab up``, or ``tasklab api --workers N``) calls ``prepare_dir(settings)``
  and puts the returned variable into the environment it passes to its children, before any
  child starts; children import prometheus_client after they start, so they see it;
* Celery prefork children are forked from a worker main process that already has the variable
  and already chose the multiprocess value class; the values notice the new pid after the fork
  and open their own files;
* nothing sets the variable from inside a process that has already imported prometheus_client:
  ``value_class_matches_env()`` detects that mistake and ``check(settings)`` logs it.

Dead processes: gauges in ``live*`` modes must be dropped when their process exits
(``mark_process_dead``). Celery children do it from ``worker_process_shutdown``; children that
were SIGKILLed are caught by ``reap_dead_processes`` when ``/metrics`` is scraped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from tasklab.settings import Settings

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
_LEGACY_ENV_VAR = "prometheus_multiproc_dir"
DIR_NAME = "prometheus-multiproc"
STARTED_AT_FILE = "started_at"  # not *.db: MultiProcessCollector ignores it
_PID_IN_FILE = re.compile(r"_(\d+)\.db$")
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")

log = logging.getLogger(__name__)


def dir_for(settings: Settings) -> Path:
    """Where tasklab keeps the multiprocess files: under ``home_dir``, never shared."""
    return (settings.home_dir / DIR_NAME).resolve()


def prepare_dir(settings: Settings) -> dict[str, str]:
    """Empty (or create) the directory and return the env the parent passes to its children.

    Call it in the parent once per start, before any child runs: files left by a previous run
    would otherwise be added to this run's counters.
    """
    path = dir_for(settings)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / STARTED_AT_FILE).write_text(f"{time.time():.3f}")
    return {ENV_VAR: str(path)}


def dir_from_env() -> Path | None:
    """The directory this process writes to, or None in single-process mode."""
    value = os.environ.get(ENV_VAR) or os.environ.get(_LEGACY_ENV_VAR)
    return Path(value) if value else None


def value_class_matches_env() -> bool:
    """False if the env var and the value class prometheus_client chose at import disagree."""
    from prometheus_client import values

    multiprocess_values = values.ValueClass is not values.MutexValue
    return multiprocess_values == (dir_from_env() is not None)


def check(settings: Settings) -> list[str]:
    """Log (and return) the multiprocess misconfigurations this process can see."""
    problems = []
    if not value_class_matches_env():
        problems.append(
            f"{ENV_VAR} was set after prometheus_client was imported: this "
            "process's metrics are not shared; set it in the parent's environment"
        )
    if settings.api_workers > 1 and dir_from_env() is None:
        problems.append(
            f"api_workers={settings.api_workers} without {ENV_VAR}: each scrape "
            "sees one worker's metrics; start the API with `tasklab up` or "
            "`tasklab api` (they prepare the directory)"
        )
    for problem in problems:
        log.warning("prometheus multiprocess: %s", problem)
    return problems


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (no-op in single-process mode)."""
    path = dir_from_env()
    if path is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def on_worker_process_shutdown(sender: Any = None, pid: int | None = None, **_kwargs: Any) -> None:
    """Celery ``worker_process_shutdown`` receiver (runs in the exiting pool child)."""
    mark_process_dead(pid or os.getpid())


def connect_celery_signals() -> None:
    """Connect the pool-child shutdown hook; call once in the worker process."""
    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(
        on_worker_process_shutdown, weak=False, dispatch_uid="tasklab.observe.multiproc"
    )


def pids_in(path: Path) -> set[int]:
    """Pids that have written metric files in ``path``."""
    pids = set()
    for entry in path.glob("*.db"):
        match = _PID_IN_FILE.search(entry.name)
        if match:
            pids.add(int(match.group(1)))
    return pids


def reap_dead_processes(path: Path) -> list[int]:
    """Drop the live gauges of processes that died without saying so (SIGKILL, OOM)."""
    dead = set()
    for entry in path.glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.match(entry.name)
        if match and not psutil.pid_exists(int(match.group(1))):
            dead.add(int(match.group(1)))
    if dead:
        from prometheus_client import multiprocess

        for pid in dead:
            multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
    return sorted(dead)


NODES_DIR_NAME = "prometheus-multiproc-nodes"
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.@-]")


def node_dir_for(settings: Settings, nodename: str) -> Path:
    """A worker node's own folder (one per node name: two workers of one home folder on one
    host must not empty each other's)."""
    return (settings.home_dir / NODES_DIR_NAME / _UNSAFE_IN_NAME.sub("_", nodename)).resolve()


def prepare_node_env(settings: Settings, nodename: str) -> Path:
    """The folder a worker node writes its metrics to: the one its parent prepared (``tasklab
    up``), else a fresh one of its own, put into this process's environment. Call it before
    anything imports prometheus_client (see the module's note on ordering)."""
    inherited = dir_from_env()
    if inherited is not None:
        return inherited
    path = node_dir_for(settings, nodename)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / STARTED_AT_FILE).write_text(f"{time.time():.3f}")
    os.environ[ENV_VAR] = str(path)
    return path


def start_node_metrics(
    settings: Settings, nodename: str, *, port: int | None, host: str | None
) -> Any:
    """Prepare the node's folder and serve it (``tasklab.observe.node``); None when the port
    is 0. ``port`` given (or ``worker_metrics_port`` set) is used as set. Raises PortTaken."""
    from celery.utils.nodenames import host_format

    from tasklab.ports import PortWish

    chosen_by = "--metrics-port" if port is not None else None
    if port is None:
        port = settings.worker_metrics_port
        if "worker_metrics_port" in settings.model_fields_set:
            chosen_by = "worker_metrics_port"
    if port == 0:
        return None
    path = prepare_node_env(settings, host_format(nodename))
    from tasklab.observe.node import serve_node_metrics

    wish = PortWish(port, chosen_by=chosen_by)
    return serve_node_metrics(path, os.getpid(), host=host or settings.api_host, wish=wish)


# --- compaction of dead processes' files --------------------------------------------------------
# Pool children are recycled (worker_max_tasks_per_child); each leaves its counter, histogram
# and gauge files behind, and every scrape reads every file. Dead processes' files are merged
# into one archive per kind (``counter_archive.db``...), which MultiProcessCollector reads as
# any other file. Live gauges are not archived (mark_process_dead drops them), nor ``all``
# gauges (their pid label is their meaning).
ARCHIVE = "archive"
LOCK_FILE = "compact.lock"  # not *.db
_DEAD_FILE = re.compile(r"^(counter|histogram|summary|gauge_(?:min|max|sum|mostrecent))_(\d+)\.db$")


@contextlib.contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """Exclusive over the processes that read or compact ``path`` (several uvicorn workers
    serve one folder): a scrape never sees a file both archived and still in place."""
    with (path / LOCK_FILE).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compact_dead_processes(path: Path) -> list[int]:
    """Merge the files of processes that are gone into the folder's archives; return their
    pids. Call it under ``folder_lock``. Values add up (counters, histograms, ``sum``
    gauges), or keep the extreme (``min``/``max``) or the latest (``mostrecent``)."""
    groups: dict[str, list[Path]] = {}
    dead: set[int] = set()
    for entry in path.glob("*.db"):
        match = _DEAD_FILE.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or psutil.pid_exists(pid):
            continue
        groups.setdefault(match.group(1), []).append(entry)
        dead.add(pid)
    for kind, files in groups.items():
        _merge_into_archive(path / f"{kind}_{ARCHIVE}.db", files, kind)
    return sorted(dead)


def _merge_into_archive(archive: Path, files: list[Path], kind: str) -> None:
    from prometheus_client.mmap_dict import MmapedDict

    merged: dict[str, tuple[float, float]] = {}
    for source in [archive, *files] if archive.exists() else files:
        values = MmapedDict.read_all_values_from_file(str(source))  # type: ignore[no-untyped-call]
        for key, value, timestamp, _pos in values:
            merged[key] = _merge(kind, merged.get(key), (value, timestamp))
    temporary = archive.with_name(archive.name + ".tmp")  # not *.db: not read meanwhile
    temporary.unlink(missing_ok=True)
    out = MmapedDict(str(temporary))  # type: ignore[no-untyped-call]
    try:
        for key, (value, timestamp) in merged.items():
            out.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
    finally:
        out.close()  # type: ignore[no-untyped-call]
    # A crash between these two steps would count the merged files twice until the next
    # start (prepare_dir empties the folder); the other order would lose them instead.
    os.replace(temporary, archive)
    for source in files:
        source.unlink(missing_ok=True)


def _merge(
    kind: str, old: tuple[float, float] | None, new: tuple[float, float]
) -> tuple[float, float]:
    if old is None:
        return new
    if kind == "gauge_min":
        return min(old, new)
    if kind == "gauge_max":
        return max(old, new)
    if kind == "gauge_mostrecent":
        return max(old, new, key=lambda pair: pair[1])
    return (old[0] + new[0], max(old[1], new[1]))
