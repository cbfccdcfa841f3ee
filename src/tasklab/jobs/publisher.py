"""Publishing job messages to the broker, behind a circuit breaker.

A message carries only the job id; the record in SQL is the truth. Publishing never retries
inside kombu (that is what makes Celery hang when the broker is down): it fails within
``publish_timeout_s`` and the breaker makes later attempts free until a probe succeeds.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Celery

from tasklab.celery_app import broker_priority, make_celery
from tasklab.errors import BrokerUnavailable
from tasklab.jobs.breaker import CircuitBreaker
from tasklab.observe import metrics
from tasklab.settings import Settings

if TYPE_CHECKING:
    from tasklab.jobs.registry import JobSpec


@dataclass(frozen=True)
class Outgoing:
    """One job message: the task's name and the job id it carries."""

    task: str
    job_id: str
    queue: str
    priority: int
    countdown_s: float = 0
    message_id: str | None = None


class Publisher:
    def __init__(self, settings: Settings, *, app: Celery | None = None) -> None:
        self.settings = settings
        self._app = app
        self.breaker = CircuitBreaker(settings.breaker_reset_s)

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
        """Send several messages, in one round trip where the transport can (kombu's Redis
        publish batch: one pipeline); return their ids. All or nothing as far as the caller
        knows: on BrokerUnavailable some may have reached the broker (a duplicate delivery
        is skipped by the claim), none is confirmed."""
        if not self.breaker.allow():
            metrics.BROKER_PUBLISH_FAILURES.labels("circuit_open").inc()
            raise BrokerUnavailable("broker circuit is open")
        ids = [m.message_id or uuid.uuid4().hex for m in messages]
        app = self.app
        try:
            with (
                app.producer_or_acquire() as producer,
                # a batch costs a pipeline object: worth it from two messages on
                producer.batch() if len(messages) > 1 else contextlib.nullcontext(),
            ):
                for message, message_id in zip(messages, ids, strict=True):
                    app.send_task(
                        message.task,
                        args=[message.job_id],
                        task_id=message_id,
                        queue=message.queue,
                        routing_key=message.queue,
                        priority=broker_priority(self.settings, message.priority),
                        countdown=message.countdown_s or None,
                        retry=False,
                        ignore_result=True,
                        producer=producer,
                    )
        except Exception as e:  # kombu/redis/amqp raise many types; all mean "not accepted"
            metrics.BROKER_PUBLISH_FAILURES.labels(type(e).__name__).inc()
            self.breaker.record_failure(type(e).__name__)
            raise BrokerUnavailable(f"broker did not accept the message: {e}") from e
        self.breaker.record_success()
        return ids

    def reschedule(
        self, spec: JobSpec, job_id: str, queue: str, attempt: int, delay_s: float
    ) -> None:
        """Publish a failed job's next attempt with a countdown. If the broker is down the
        job stays RETRYING and the reaper publishes it once due and the broker answers."""
        with contextlib.suppress(BrokerUnavailable):
            self.publish(
                spec.name, job_id, queue=queue, priority=spec.priority, countdown_s=delay_s
            )

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
