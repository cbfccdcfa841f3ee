"""Declaring jobs: ``@job(queue=..., priority=..., max_attempts=...)``.

A declaration registers the function with tasklab (for the local fallback executor and for
validation at submit) and as a Celery task on every app (``shared_task``), whose message carries
only the job id: arguments live in the durable SQL record.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task

from tasklab.celery_app import DEFAULT_PRIORITY, DEFAULT_QUEUE, MAX_PRIORITY, QUEUES
from tasklab.errors import JobDeclarationError, UnknownTask

_REGISTRY: dict[str, JobSpec] = {}


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 300.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()

    def delay_s(self, attempt: int) -> float:
        """Exponential backoff after ``attempt`` failed attempts, with full jitter."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return random.uniform(ceiling / 2, ceiling) if self.jitter else ceiling

    def should_retry(self, exc: BaseException, attempt: int, max_attempts: int) -> bool:
        if attempt >= max_attempts or isinstance(exc, self.dont_retry_on):
            return False
        return isinstance(exc, self.retry_on)


@dataclass(frozen=True)
class JobSpec:
    name: str
    func: Callable[..., Any]
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    soft_time_limit_s: float | None = None
    time_limit_s: float | None = None
    lease_s: float | None = None
    bind: bool = False
    # fn(conn, ended): runs in the transaction that makes the job DEAD or CANCELLED
    # (tasklab.jobs.hooks).
    on_give_up: Callable[[Any, Any], None] | None = None

    @property
    def bundles(self) -> bool:
        """May share a broker message with other jobs (a Celery time limit is per message)."""
        return self.soft_time_limit_s is None and self.time_limit_s is None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling the declared function directly runs it in-process, without a job record."""
        return self.func(*args, **kwargs)


_OPTIONS = {
    "name",
    "queue",
    "priority",
    "max_attempts",
    "backoff_s",
    "backoff_max_s",
    "jitter",
    "retry_on",
    "dont_retry_on",
    "soft_time_limit_s",
    "time_limit_s",
    "lease_s",
    "bind",
    "on_give_up",
}


def job(func: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Declare a job. Unknown options are rejected here, not at the first submit.

    Options: name, queue, priority (0 least .. 9 most urgent), max_attempts, backoff_s,
    backoff_max_s, jitter, retry_on, dont_retry_on, soft_time_limit_s, time_limit_s, lease_s,
    bind (pass the JobContext as the first argument), on_give_up (``fn(conn, ended)``, run in
    the transaction that makes the job DEAD or CANCELLED: tasklab.jobs.hooks).
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise JobDeclarationError(
            f"unknown job option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}"
        )

    def declare(f: Callable[..., Any]) -> JobSpec:
        spec = _build_spec(f, options)
        _REGISTRY[spec.name] = spec
        _register_celery_task(spec)
        return spec

    return declare(func) if func is not None else declare


def _build_spec(f: Callable[..., Any], o: dict[str, Any]) -> JobSpec:
    priority = o.get("priority", DEFAULT_PRIORITY)
    if not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise JobDeclarationError(f"priority must be an int 0..{MAX_PRIORITY}, got {priority!r}")
    retry_kw: dict[str, Any] = {
        k: o[k] for k in ("max_attempts", "backoff_s", "backoff_max_s", "jitter") if k in o
    }
    for k in ("retry_on", "dont_retry_on"):
        if k in o:
            value = o[k]
            retry_kw[k] = tuple(value) if isinstance(value, list | tuple) else (value,)
    queue = o.get("queue", DEFAULT_QUEUE)
    if queue not in QUEUES:
        raise JobDeclarationError(
            f"unknown queue {queue!r}: no tasklab worker or reaper watches it; "
            f"tasklab's queues are {', '.join(QUEUES)}"
        )
    policy = RetryPolicy(**retry_kw)
    if policy.max_attempts < 1:
        raise JobDeclarationError("max_attempts must be >= 1")
    return JobSpec(
        name=o.get("name") or f"{f.__module__}.{f.__qualname__}",
        func=f,
        queue=queue,
        priority=priority,
        retry=policy,
        soft_time_limit_s=o.get("soft_time_limit_s"),
        time_limit_s=o.get("time_limit_s"),
        lease_s=o.get("lease_s"),
        bind=bool(o.get("bind", False)),
        on_give_up=o.get("on_give_up"),
    )


# Every job message: no Celery result (the outcome is in SQL), acked after the run, and back
# in the queue if the pool process running it dies.
_DELIVERY_OPTIONS: dict[str, Any] = {
    "bind": True,
    "ignore_result": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
}


def _register_celery_task(spec: JobSpec) -> None:
    from tasklab.jobs.worker_side import run_delivery

    def deliver(self: Any, job_id: str) -> None:
        run_delivery(self.app, spec, job_id, self.request.id)

    deliver.__name__ = spec.name.rsplit(".", 1)[-1]
    shared_task(
        name=spec.name,
        soft_time_limit=spec.soft_time_limit_s,
        time_limit=spec.time_limit_s,
        **_DELIVERY_OPTIONS,
    )(deliver)


def _register_bundle_task() -> None:
    """The Celery task that runs a bundle of jobs (see tasklab.jobs.publisher). Only jobs
    declared without a time limit are bundled, so it has none of its own (the app's defaults
    apply to the whole bundle); each job keeps its own lease."""
    from tasklab.jobs.publisher import BUNDLE_TASK

    def deliver_bundle(self: Any, task: str, job_ids: list[str], queue: str, priority: int) -> None:
        from tasklab.jobs.worker_side import run_bundle  # imports this module

        run_bundle(self.app, get_spec(task), job_ids, queue, priority, self.request.id)

    shared_task(name=BUNDLE_TASK, **_DELIVERY_OPTIONS)(deliver_bundle)


def get_spec(task: str | JobSpec) -> JobSpec:
    if isinstance(task, JobSpec):
        return task
    try:
        return _REGISTRY[task]
    except KeyError:
        raise UnknownTask(task) from None


def registered() -> dict[str, JobSpec]:
    return dict(_REGISTRY)


_register_bundle_task()
