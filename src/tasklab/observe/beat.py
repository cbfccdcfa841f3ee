"""Beat liveness: a heartbeat task beat dispatches on a schedule, seen from two sides.

* In the beat process, ``connect_beat_signals()`` sets ``tasklab_beat_last_run_timestamp_seconds``
  on every task beat publishes (shared with the API's ``/metrics`` in multiprocess mode).
* The exporter sees the heartbeat's ``task-sent`` event (``task_send_sent_event`` is on) and
  sets the same gauge, so deployments that scrape only the exporter see it too.

Schedule delay: beat stamps each message it publishes with its dispatch time
(``tasklab_beat_sent_at`` header) and the workers observe, before running any task that
carries it, the wait from then in ``tasklab_job_queue_wait_seconds{task, queue}``, so
``TasklabScheduleDelay`` measures beat's tasks (the heartbeat on ``scheduled`` every 30 s);
one that expired in the queue is observed when the worker drops it.

The heartbeat task does nothing; it must be registered on the workers (add this module to the
worker's task modules) so its delivery is not an "unregistered task" error.
"""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from tasklab.observe.metrics import BEAT_LAST_TICK, JOB_QUEUE_WAIT

BEAT_HEARTBEAT_TASK = "tasklab.observe.beat_heartbeat"
BEAT_HEARTBEAT_ENTRY = "tasklab-beat-heartbeat"
BEAT_HEARTBEAT_INTERVAL_S = 30.0
BEAT_HEARTBEAT_QUEUE = "scheduled"
BEAT_SENT_AT_HEADER = "tasklab_beat_sent_at"  # epoch seconds, stamped on beat's messages


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


def on_beat_publish(sender: Any = None, headers: Any = None, **_kwargs: Any) -> None:
    """``before_task_publish`` receiver, connected in the beat process only: marks beat's
    last dispatch and stamps the message with its dispatch time (the headers are sent)."""
    now = time.time()
    BEAT_LAST_TICK.set(now)
    if isinstance(headers, dict):
        headers[BEAT_SENT_AT_HEADER] = now


def on_task_prerun(sender: Any = None, task: Any = None, **_kwargs: Any) -> None:
    """``task_prerun`` receiver in the workers: a task beat dispatched has waited from its
    dispatch (or its ETA, when later) to now, in ``tasklab_job_queue_wait_seconds``."""
    if task is not None:
        observe_schedule_wait(str(task.name), getattr(task, "request", None))


def on_task_revoked(
    sender: Any = None, request: Any = None, expired: bool = False, **_kwargs: Any
) -> None:
    """``task_revoked`` receiver: a beat task that expired in the queue (the heartbeat expires
    after its interval) never starts, yet it waited that long: observed too, or a backed-up
    scheduled queue would show no wait at all."""
    if expired and sender is not None:
        observe_schedule_wait(str(sender.name), request)


def observe_schedule_wait(task_name: str, request: Any) -> None:
    sent_at = getattr(request, BEAT_SENT_AT_HEADER, None)
    if not isinstance(sent_at, int | float):
        return  # not dispatched by beat
    queue = (getattr(request, "delivery_info", None) or {}).get("routing_key") or "unknown"
    since = float(sent_at)
    eta = getattr(request, "eta", None)
    if eta:
        from celery.utils.time import maybe_iso8601

        parsed = maybe_iso8601(eta)
        since = max(since, parsed.timestamp()) if parsed is not None else since
    JOB_QUEUE_WAIT.labels(task_name, str(queue)).observe(max(0.0, time.time() - since))


def on_beat_init(sender: Any = None, **_kwargs: Any) -> None:
    from celery.signals import before_task_publish

    before_task_publish.connect(
        on_beat_publish, weak=False, dispatch_uid="tasklab.observe.beat.publish"
    )


def connect_beat_signals() -> None:
    """Call once where the beat or worker process builds its app: beat_init fires in beat
    only, task_prerun in workers only."""
    from celery.signals import beat_init, task_prerun, task_revoked

    beat_init.connect(on_beat_init, weak=False, dispatch_uid="tasklab.observe.beat.init")
    task_prerun.connect(on_task_prerun, weak=False, dispatch_uid="tasklab.observe.beat.prerun")
    task_revoked.connect(on_task_revoked, weak=False, dispatch_uid="tasklab.observe.beat.revoked")
