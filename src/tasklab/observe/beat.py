"""Beat liveness: a heartbeat task beat dispatches on a schedule, seen from two sides.

* In the beat process, ``connect_beat_signals()`` sets ``tasklab_beat_last_run_timestamp_seconds``
  on every task beat publishes (shared with the API's ``/metrics`` in multiprocess mode).
* The exporter sees the heartbeat's ``task-sent`` event (``task_send_sent_event`` is on) and
  sets the same gauge, so deployments that scrape only the exporter see it too.

The heartbeat task does nothing; it must be registered on the workers (add this module to the
worker's task modules) so its delivery is not an "unregistered task" error.
"""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from tasklab.observe.metrics import BEAT_LAST_TICK

BEAT_HEARTBEAT_TASK = "tasklab.observe.beat_heartbeat"
BEAT_HEARTBEAT_ENTRY = "tasklab-beat-heartbeat"
BEAT_HEARTBEAT_INTERVAL_S = 30.0
BEAT_HEARTBEAT_QUEUE = "scheduled"


@shared_task(name=BEAT_HEARTBEAT_TASK, ignore_result=True)
def beat_heartbeat() -> None:
    """Scheduled by beat so that beat's liveness is observable; does nothing."""


def beat_schedule_entries(interval_s: float = BEAT_HEARTBEAT_INTERVAL_S) -> dict[str, Any]:
    """Entries to merge into ``beat_schedule``. Expired heartbeats are dropped, not run late."""
    return {
        BEAT_HEARTBEAT_ENTRY: {
            "task": BEAT_HEARTBEAT_TASK,
            "schedule": interval_s,
            "options": {"queue": BEAT_HEARTBEAT_QUEUE, "expires": interval_s},
        }
    }


def on_beat_publish(sender: Any = None, **_kwargs: Any) -> None:
    """``before_task_publish`` receiver, connected in the beat process only."""
    BEAT_LAST_TICK.set(time.time())


def on_beat_init(sender: Any = None, **_kwargs: Any) -> None:
    from celery.signals import before_task_publish

    before_task_publish.connect(
        on_beat_publish, weak=False, dispatch_uid="tasklab.observe.beat.publish"
    )


def connect_beat_signals() -> None:
    """Call once where the beat process builds its app; harmless in workers (beat_init only
    fires in beat)."""
    from celery.signals import beat_init

    beat_init.connect(on_beat_init, weak=False, dispatch_uid="tasklab.observe.beat.init")
