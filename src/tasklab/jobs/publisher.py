"""Publishing job messages to the broker, behind a circuit breaker.

A message carries only job ids; the record in SQL is the truth. Jobs of one task, queue and
priority published together may share one message (a bundle, up to ``bundle_max`` ids): Celery
spends most of a short job's cost per message, in the broker and in the worker, so a bundle
pays it once. Publishing never retries inside kombu (that is what makes Celery hang when the
broker is down): it fails within ``publish_timeout_s`` and the breaker makes later attempts
free until a probe succeeds.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from celery import Celery
from kombu import Connection  # type: ignore[attr-defined]

from tasklab.celery_app import broker_priority, make_celery
from tasklab.errors import BrokerUnavailable
from tasklab.jobs.breaker import CircuitBreaker
from tasklab.observe import metrics
from tasklab.settings import Settings

if TYPE_CHECKING:
    from tasklab.jobs.registry import JobSpec

# The Celery task that runs a bundle: (task name, job ids, queue, priority).
BUNDLE_TASK = "tasklab.bundle"


@dataclass(frozen=True)
class Outgoing:
    """One job to publish: its task's name and id; ``bundle``: it may share a message with
    other jobs of the same task, queue and priority (no countdown, no Celery time limit)."""

    task: str
    job_id: str
    queue: str
    priority: int
    countdown_s: float = 0
    message_id: str | None = None
    bundle: bool = False


class Publisher:
    def __init__(self, settings: Settings, *, app: Celery | None = None) -> None:
        self.settings = settings
        self._app = app
        self.breaker = CircuitBreaker(settings.breaker_reset_s, probe=self.probe)

    @property
    def app(self) -> Celery:
        """Built on first use, so read-only users of JobManager need no broker configured."""
        if self._app is None:
            self._app = make_celery(self.settings, include=[], for_publishing=True)
        return self._app

    def publish(
        self,
        task: str,
        job_id: str,
        *,
        queue: str,
        priority: int,
        countdown_s: float = 0,
        message_id: str | None = None,
    ) -> str:
        """Send one message; return its id. Raises BrokerUnavailable at once if the circuit
        is open, or after at most publish_timeout_s if the broker does not answer."""
        out = Outgoing(task, job_id, queue, priority, countdown_s, message_id)
        return self.publish_many([out])[0]

    def publish_many(self, messages: Sequence[Outgoing]) -> list[str]:
        """Send several jobs, in one round trip where the transport can (kombu's Redis
        publish batch: one pipeline), bundling those that may be; return the id of the
        message that carries each job. All or nothing as far as the caller knows: on
        BrokerUnavailable some may have reached the broker (a duplicate delivery is skipped
        by the claim), none is confirmed."""
        if not self.breaker.allow():
            metrics.BROKER_PUBLISH_FAILURES.labels("circuit_open").inc()
            raise BrokerUnavailable("broker circuit is open")
        ids = [m.message_id or uuid.uuid4().hex for m in messages]
        sends = self._plan(messages, ids)
        app = self.app
        try:
            with (
                app.producer_or_acquire() as producer,
                # a batch costs a pipeline object: worth it from two messages on
                producer.batch() if len(sends) > 1 else contextlib.nullcontext(),
            ):
                for task, args, first, message_id in sends:
                    app.send_task(
                        task,
                        args=args,
                        task_id=message_id,
                        queue=first.queue,
                        routing_key=first.queue,
                        priority=broker_priority(self.settings, first.priority),
                        countdown=first.countdown_s or None,
                        retry=False,
                        ignore_result=True,
                        producer=producer,
                    )
        except Exception as e:  # kombu/redis/amqp raise many types; all mean "not accepted"
            metrics.BROKER_PUBLISH_FAILURES.labels(type(e).__name__).inc()
            self.breaker.record_failure(type(e).__name__)
            raise BrokerUnavailable(f"broker did not accept the message: {e}") from e
        except BaseException:  # interrupted (shutdown, time limit): no verdict on the broker
            self.breaker.release_probe()
            raise
        self.breaker.record_success()
        return ids

    def probe(self) -> None:
        """Raise unless the broker answers within ``publish_timeout_s`` (the breaker's probe,
        run in a thread of its own while the circuit is open)."""
        timeout_s = self.settings.publish_timeout_s
        url = self.settings.effective_broker_url
        if self.settings.broker_is_redis:
            client = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
            try:
                client.ping()
            finally:
                client.close()
            return
        with Connection(url, connect_timeout=timeout_s) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=0, timeout=timeout_s)

    def _plan(
        self, messages: Sequence[Outgoing], ids: list[str]
    ) -> list[tuple[str, list[object], Outgoing, str]]:
        """(task, args, the first job, message id) per message to send; ``ids`` is updated
        so that each bundled job gets its bundle's message id."""
        sends: list[tuple[str, list[object], Outgoing, str]] = []
        groups: defaultdict[tuple[str, str, int], list[int]] = defaultdict(list)
        for i, m in enumerate(messages):
            if m.bundle and not m.countdown_s and self.settings.bundle_max > 1:
                groups[(m.task, m.queue, m.priority)].append(i)
            else:
                sends.append((m.task, [m.job_id], m, ids[i]))
        size = self.settings.bundle_max
        for (task, queue, priority), members in groups.items():
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                first = messages[chunk[0]]
                if len(chunk) == 1:
                    sends.append((task, [first.job_id], first, ids[chunk[0]]))
                    continue
                bundle_id = uuid.uuid4().hex
                job_ids = [messages[i].job_id for i in chunk]
                sends.append((BUNDLE_TASK, [task, job_ids, queue, priority], first, bundle_id))
                for i in chunk:
                    ids[i] = bundle_id
        return sends

    def publish_bundle(self, task: str, job_ids: Sequence[str], queue: str, priority: int) -> str:
        """Send jobs of one task as one bundle (a worker handing back what it did not run)."""
        members = [Outgoing(task, job_id, queue, priority, bundle=True) for job_id in job_ids]
        return self.publish_many(members)[0]

    def reschedule(
        self, spec: JobSpec, job_id: str, queue: str, priority: int, delay_s: float
    ) -> None:
        """Publish a failed job's next attempt with a countdown, at the job's own priority.
        If the broker is down the job stays RETRYING and the reaper publishes it once due
        and the broker answers."""
        with contextlib.suppress(BrokerUnavailable):
            self.publish(spec.name, job_id, queue=queue, priority=priority, countdown_s=delay_s)

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
