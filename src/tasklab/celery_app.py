"""Celery app factory with production defaults; docs/celery-config.md explains each choice."""

from __future__ import annotations

import socket
from typing import Any

from celery import Celery
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from tasklab.kombu_redis import TRANSPORT
from tasklab.settings import Settings

# Queues, most urgent first: a worker consuming several queues polls them in this order.
QUEUES = ("high", "default", "low", "data_sync", "scheduled")
DEFAULT_QUEUE = "default"
# tasklab priorities run 0 (least urgent) .. 9 (most urgent), like RabbitMQ; on Redis kombu
# pops 0 first, so the priority is mirrored when published there (see redis_priority()).
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
# Modules whose tasks every tasklab worker registers.
TASK_MODULES = [
    "tasklab.lab.probes",
    "tasklab.lab.probe_jobs",
    "tasklab.jobs.maintenance",
    "tasklab.service.domain.jobs",
    "tasklab.observe.beat",
]


AMQP_HEARTBEAT_S = 10
KEEPALIVE_OPTIONS = {
    socket.TCP_KEEPIDLE: 10,
    socket.TCP_KEEPINTVL: 5,
    socket.TCP_KEEPCNT: 3,
}


def redis_priority(priority: int) -> int:
    """Map a tasklab priority (9 most urgent) to a kombu-Redis priority (0 popped first)."""
    return MAX_PRIORITY - priority


def broker_priority(settings: Settings, priority: int) -> int:
    return redis_priority(priority) if settings.broker_is_redis else priority


def make_celery(
    settings: Settings,
    *,
    name: str = "tasklab",
    include: list[str] | None = None,
    for_publishing: bool = False,
) -> Celery:
    """Build a Celery app from settings.

    ``for_publishing`` builds a producer-side app whose broker sockets time out after
    ``publish_timeout_s``, so a frozen broker fails a publish fast instead of hanging a request.
    """
    modules = [*TASK_MODULES, *settings.imports] if include is None else include
    app = Celery(name, include=list(modules))
    app.conf.update(_config(settings, for_publishing=for_publishing))
    return app


def _config(settings: Settings, *, for_publishing: bool) -> dict[str, Any]:
    is_redis = settings.broker_is_redis
    conf: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        "result_backend": settings.effective_result_backend,
        # JSON only: pickle lets whoever can write to the broker run code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the task ran, and re-queue if the worker process died, so a crash mid-task
        # is retried instead of lost. Tasks must be idempotent (tasklab jobs are, by fencing).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # On connection loss, late-ack messages are redelivered: at once by RabbitMQ (cancel
        # the running copy rather than let it run twice), after the visibility timeout by
        # Redis, where cancelling gains nothing and its retry-state write to the (same, down)
        # Redis can fail half way and leave the pool's slots taken: a worker that reconnects
        # but never runs a task again (docs/celery-config.md).
        "worker_cancel_long_running_tasks_on_connection_loss": not settings.broker_is_redis,
        # Prefetch a few messages per process: enough to hide broker round trips on short
        # tasks, few enough that long tasks do not sit reserved behind a busy process.
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        "worker_concurrency": settings.effective_concurrency,
        "worker_pool": settings.worker_pool,
        # Recycle child processes to bound leaks in task code.
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child,
        "worker_max_memory_per_child": settings.worker_max_memory_per_child_kb,
        # Soft limit raises SoftTimeLimitExceeded inside the task so it can clean up; the hard
        # limit kills the process if it does not.
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        # Keep results in the backend only as long as someone could want them; bounds memory.
        "result_expires": settings.result_expires_s,
        # Per-task events feed Flower (off by default, as in Celery: three broker messages
        # per task, and jobs have their own metrics). "task-sent" stays on for this app: beat
        # publishes through it, and the exporter sees beat by it.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": True,
        "task_track_started": True,
        # Queues and routing.
        "task_queues": _queues(settings),
        "task_default_queue": DEFAULT_QUEUE,
        "task_default_priority": broker_priority(settings, DEFAULT_PRIORITY),
        "task_queue_max_priority": MAX_PRIORITY,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
    }
    if for_publishing:
        # The job record already has the submit time; a "task-sent" event per publish would
        # double the broker round trips on the hot path.
        conf["task_send_sent_event"] = False
    if is_redis:
        conf.update(_redis_transport(settings, for_publishing=for_publishing))
        if settings.effective_broker_url.startswith("redis://"):
            # kombu's Redis transport, minus a client object built per publish and per ack.
            conf["broker_transport"] = TRANSPORT
    else:
        # AMQP heartbeats both ways: a worker cut off from RabbitMQ notices within two
        # missed beats (Celery's default is 120 s), and RabbitMQ gives its unacked messages
        # to other workers as soon.
        conf["broker_heartbeat"] = AMQP_HEARTBEAT_S
        # Publisher confirms: a publish returns once RabbitMQ has the message (on disk for a
        # durable queue), and raises if it refused it (a full queue that rejects publishes),
        # so a job is marked QUEUED only when its message is really there.
        transport: dict[str, Any] = {"confirm_publish": True}
        if for_publishing:
            transport.update(_fail_fast(settings))
            # py-amqp's own socket timeouts: a frozen broker fails the publish (or its
            # confirm) within publish_timeout_s
            transport["read_timeout"] = transport["write_timeout"] = settings.publish_timeout_s
            conf["broker_connection_timeout"] = settings.publish_timeout_s
        conf["broker_transport_options"] = transport
    return conf


def _fail_fast(settings: Settings) -> dict[str, Any]:
    """Producer-side: no reconnect loop and short socket timeouts, so a dead or frozen broker
    costs one publish at most ``publish_timeout_s`` (the circuit breaker does the rest)."""
    return {
        "max_retries": 0,
        "connect_retries_timeout": settings.publish_timeout_s,
        "socket_timeout": settings.publish_timeout_s,
    }


def _redis_transport(settings: Settings, *, for_publishing: bool) -> dict[str, Any]:
    vt = settings.visibility_timeout_s
    transport: dict[str, Any] = {
        # Unacked messages come back after this; must exceed the longest task time limit and
        # countdown, or long tasks get delivered twice. tasklab's leases recover crashed
        # tasks much sooner, so this can stay long.
        "visibility_timeout": vt,
        # Ten real priority levels (kombu's default is 4 steps: 0, 3, 6, 9).
        "priority_steps": list(range(MAX_PRIORITY + 1)),
        "sep": ":",
        "queue_order_strategy": "priority",
        "socket_connect_timeout": settings.publish_timeout_s,
        "health_check_interval": 10,
        # The kernel finds a vanished broker: 10 s idle, then 3 unanswered probes 5 s apart.
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE_OPTIONS,
    }
    if for_publishing:
        transport.update(_fail_fast(settings))
    return {
        "broker_transport_options": transport,
        # Celery reads the visibility timeout in these places too; keep them all equal.
        "result_backend_transport_options": {"visibility_timeout": vt},
        "visibility_timeout": vt,
        "redis_socket_connect_timeout": settings.publish_timeout_s,
        "redis_backend_health_check_interval": 10,
        "redis_retry_on_timeout": True,
    }


def _queues(settings: Settings) -> list[Queue]:
    if settings.broker_is_redis:
        return [Queue(q, Exchange(q), routing_key=q) for q in QUEUES]
    args: dict[str, Any]
    if settings.amqp_queue_type == "quorum":
        # Quorum queues replicate messages across nodes (survive a node loss) but, on
        # RabbitMQ < 4, have no priorities.
        args = {"x-queue-type": "quorum"}
    else:
        args = {"x-max-priority": MAX_PRIORITY}
    return [
        Queue(q, Exchange(q), routing_key=q, queue_arguments=args, durable=True) for q in QUEUES
    ]
