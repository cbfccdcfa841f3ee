"""A plain Celery app that knows nothing of tasklab but one line: the lab's probe tasks are in
its ``imports``, so ``tasklab stress/bench/tune --app examples.user_app.celery_app:app`` can
measure its workers.

Like most Celery apps it takes its broker from the environment (``CELERY_BROKER_URL``,
``CELERY_RESULT_BACKEND``); the lab itself reads nothing from it.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery(
    "user_app", broker=BROKER_URL, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER_URL)
)
app.conf.update(
    # The one tasklab line: the lab's probes (noop, sleep, cpu, mixed, fail).
    imports=["tasklab.lab.probes", "examples.user_app.tasks"],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_max_tasks_per_child=1000,
    broker_connection_retry_on_startup=True,
)
