"""The worker-side Celery app: tasks, hooks and the beat schedule wired onto ``make_celery``.

``celery -A tasklab.worker worker`` works too: the module attribute ``app`` is built from the
environment on first access (never at import).
"""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery, signals

from tasklab.celery_app import make_celery
from tasklab.observe import beat, multiproc
from tasklab.settings import Settings, load_settings

_reaper: Any = None
_links: Any = None


def build_worker_app(settings: Settings) -> Celery:
    celery = make_celery(settings)
    celery.tasklab_settings = settings
    celery.conf.beat_schedule = beat_schedule(settings)
    multiproc.connect_celery_signals()
    beat.connect_beat_signals()
    signals.worker_init.connect(_freeze_heap, weak=False)
    signals.worker_ready.connect(_start_reaper, weak=False)
    signals.worker_shutdown.connect(_stop_reaper, weak=False)
    return celery


def beat_schedule(settings: Settings) -> dict[str, Any]:
    from tasklab.service.domain import scheduled

    return {
        "tasklab-purge-finished-jobs": {
            "task": "tasklab.jobs.purge",
            "schedule": 3600.0,
            "options": {"queue": "scheduled"},
        },
        **beat.beat_schedule_entries(),
        **scheduled.beat_entries(),  # points expiry, hot products warm-up
    }


def _freeze_heap(**_: Any) -> None:
    """In the main process, before it forks its pool: everything alive now goes to a
    generation the collector never visits, so a pool process's collections do not write
    to (and so copy) every page it shares with the main process. 181 -> 146 MB PSS for a
    worker of 2 processes after 2,000 jobs (docs/jobs.md, "Memory")."""
    gc.collect()
    gc.freeze()


def _start_reaper(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: recover jobs lost by crashed workers or a lost broker."""
    global _reaper
    from tasklab.database import make_engine
    from tasklab.jobs.publisher import Publisher
    from tasklab.jobs.recovery import start_reaper
    from tasklab.jobs.worker_side import settings_of

    app = sender.app if sender is not None else None
    settings = settings_of(app) if app is not None else load_settings()
    _reaper = start_reaper(settings, make_engine(settings), Publisher(settings))
    _watch_links(settings, sender)


def _watch_links(settings: Settings, consumer: Any) -> None:
    """In the main process: a dead database link stops consuming (every job would fail its
    claim), and consuming resumes when it is back. A dead broker link needs no more than its
    sockets cut: Celery's consumer then reconnects, taking nothing meanwhile."""
    global _links
    from tasklab.links import watch_links

    paused = ConsumerPause(consumer) if consumer is not None else None
    _links = watch_links(
        settings,
        on_down=paused.pause if paused is not None else None,
        on_up=paused.resume if paused is not None else None,
    )


class ConsumerPause:
    """Cancel and re-add this worker's queues, by Celery's own remote control (thread-safe:
    the worker runs it in its event loop)."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.queues: list[str] = []

    def pause(self, link: Any) -> None:
        if link.name != "database" or self.queues:
            return
        self.queues = [q.name for q in self.consumer.task_consumer.queues]
        for queue in self.queues:
            self._control().cancel_consumer(queue, destination=[self.consumer.hostname])

    def resume(self, link: Any) -> None:
        if link.name != "database":
            return
        for queue in list(self.queues):  # one left out (the broker failed too) waits for next time
            self._control().add_consumer(queue, destination=[self.consumer.hostname])
            self.queues.remove(queue)

    def _control(self) -> Any:
        return self.consumer.app.control


def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
    if _links is not None:
        _links.stop()


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        value = build_worker_app(load_settings())
        globals()[name] = value
        return value
    raise AttributeError(name)
