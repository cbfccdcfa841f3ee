"""The worker-side Celery app: tasks, hooks and the beat schedule wired onto ``make_celery``.

``celery -A tasklab.worker worker`` works too: the module attribute ``app`` is built from the
environment on first access (never at import).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from tasklab.celery_app import make_celery
from tasklab.observe import beat, multiproc
from tasklab.settings import Settings, load_settings

_reaper: Any = None


def build_worker_app(settings: Settings) -> Celery:
    celery = make_celery(settings)
    celery.tasklab_settings = settings
    celery.conf.beat_schedule = beat_schedule(settings)
    multiproc.connect_celery_signals()
    beat.connect_beat_signals()
    signals.worker_ready.connect(_start_reaper, weak=False)
    signals.worker_shutdown.connect(_stop_reaper, weak=False)
    return celery


def beat_schedule(settings: Settings) -> dict[str, Any]:
    return {
        "tasklab-purge-finished-jobs": {
            "task": "tasklab.jobs.purge",
            "schedule": 3600.0,
            "options": {"queue": "scheduled"},
        },
        **beat.beat_schedule_entries(),
    }


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


def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        value = build_worker_app(load_settings())
        globals()[name] = value
        return value
    raise AttributeError(name)
