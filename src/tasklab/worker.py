"""The worker-side Celery app: tasks, hooks and the beat schedule wired onto ``make_celery``.

``celery -A tasklab.worker worker`` works too: the module attribute ``app`` is built from the
environment on first access (never at import).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from tasklab.celery_app import make_celery
from tasklab.settings import Settings, load_settings


def build_worker_app(settings: Settings) -> Celery:
    celery = make_celery(settings)
    celery.conf.beat_schedule = beat_schedule(settings)
    return celery


def beat_schedule(settings: Settings) -> dict[str, Any]:
    return {}


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        value = build_worker_app(load_settings())
        globals()[name] = value
        return value
    raise AttributeError(name)
