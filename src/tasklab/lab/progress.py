"""What a lab command shows while it runs: a Rich progress bar per phase, a sampler thread
recording worker memory and queue depth over time — and what it keeps off the terminal."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from tasklab.lab.harness import LabStack, tree_rss_mb
from tasklab.lab.results import Series


def lab_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@contextmanager
def phase(progress: Progress, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar for one phase; yields ``update(done)``."""
    task: TaskID = progress.add_task(description, total=total)

    def update(done: int) -> None:
        progress.update(task, completed=min(done, total))

    yield update
    progress.update(task, completed=total)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """While a run provokes them, tasklab's own warnings (circuit open, leases expired, slow
    queries) go to ``path`` instead of the terminal, where they would break the progress bars."""
    logger = logging.getLogger("tasklab")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate = propagate


class Sampler:
    """Samples worker RSS (MB) and queue depth every ``interval_s`` in a daemon thread."""

    def __init__(self, stack: LabStack, *, interval_s: float = 0.25) -> None:
        self.stack = stack
        self.interval_s = interval_s
        self.rss_mb: list[tuple[float, float]] = []
        self.depth: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-sampler", daemon=True)
        self._t0 = time.time()

    def __enter__(self) -> Sampler:
        self._t0 = time.time()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        # Workers this stack started are re-listed each time (pool children get recycled);
        # external ones are asked once (``inspect stats`` costs a broadcast round trip).
        fixed = None if self.stack.nodes else self.stack.worker_pids()
        while True:
            now = round(time.time() - self._t0, 3)
            pids = fixed if fixed is not None else self.stack.worker_pids()
            self.rss_mb.append((now, tree_rss_mb(pids)))
            depth = self.stack.queue_depth()
            if depth is not None:
                self.depth.append((now, float(depth)))
            if self._stop.wait(self.interval_s):
                return

    def series(self, *, chart_prefix: str, label: str) -> list[Series]:
        rss = Series(
            f"{chart_prefix}: worker RSS",
            label,
            "line",
            "seconds",
            "MB",
            self.rss_mb,
            y_from_zero=False,
        )
        out = [rss]
        if self.depth:
            out.append(
                Series(
                    f"{chart_prefix}: queue depth",
                    label,
                    "line",
                    "seconds",
                    "messages waiting",
                    self.depth,
                )
            )
        return out
