"""Beat's tasks are measurable: the wait from beat's dispatch to the start on a worker."""

from __future__ import annotations

import time

import pytest
from celery.signals import beat_init, before_task_publish

from tasklab.celery_app import make_celery
from tasklab.migrations import migrate
from tasklab.observe.beat import BEAT_HEARTBEAT_QUEUE, BEAT_HEARTBEAT_TASK, connect_beat_signals
from tasklab.ports import free_port_on
from tasklab.settings import Settings
from tests.observe.conftest import wait_until
from tests.observe.test_node import scrape, value
from tests.support.worker import WorkerProcess

WAIT = "tasklab_job_queue_wait_seconds"


@pytest.mark.slow
def test_a_task_beat_dispatched_has_its_queue_wait_observed_by_the_worker_that_runs_it(
    settings: Settings, worker_factory: type[WorkerProcess]
) -> None:
    migrate(settings)
    port = free_port_on("127.0.0.1")
    worker = worker_factory(settings, concurrency=1, queues=BEAT_HEARTBEAT_QUEUE, name="sched")
    worker.argv += ["--metrics-port", str(port)]
    worker.start()
    celery = make_celery(settings)
    connect_beat_signals()
    beat_init.send(sender=None)  # this process now publishes as beat does
    labels = {"task": BEAT_HEARTBEAT_TASK, "queue": BEAT_HEARTBEAT_QUEUE}
    try:
        for _ in range(2):
            celery.send_task(BEAT_HEARTBEAT_TASK, queue=BEAT_HEARTBEAT_QUEUE)
        sent_at = time.time()
        samples = wait_until(
            lambda: scrape(port),
            lambda s: value(s, f"{WAIT}_count", **labels) == 2,
            timeout_s=30,
            what="two observed waits of beat's heartbeat",
        )
    finally:
        before_task_publish.disconnect(dispatch_uid="tasklab.observe.beat.publish")
        celery.close()

    waited_s = value(samples, f"{WAIT}_sum", **labels) or 0.0
    assert 0 < waited_s < 2 * (time.time() - sent_at + 1)
    # the bucket the ScheduleDelay alert reads exists for the scheduled queue
    assert value(samples, f"{WAIT}_bucket", **labels, le="+Inf") == 2


def test_a_task_published_without_beats_stamp_has_no_schedule_wait(
    settings: Settings, worker_factory: type[WorkerProcess]
) -> None:
    migrate(settings)
    port = free_port_on("127.0.0.1")
    worker = worker_factory(settings, concurrency=1, queues=BEAT_HEARTBEAT_QUEUE, name="plain")
    worker.argv += ["--metrics-port", str(port)]
    worker.start()
    celery = make_celery(settings)
    try:
        result = celery.send_task(BEAT_HEARTBEAT_TASK, queue=BEAT_HEARTBEAT_QUEUE)
        wait_until(
            lambda: worker.log(),
            lambda log: result.id in log and "succeeded" in log,
            timeout_s=30,
            what="the heartbeat to run",
        )
    finally:
        celery.close()

    labels = {"task": BEAT_HEARTBEAT_TASK, "queue": BEAT_HEARTBEAT_QUEUE}
    assert value(scrape(port), f"{WAIT}_count", **labels) is None


@pytest.mark.slow
def test_a_beat_task_that_expired_in_a_backed_up_queue_still_counts_its_wait(
    settings: Settings, worker_factory: type[WorkerProcess]
) -> None:
    migrate(settings)
    celery = make_celery(settings)
    connect_beat_signals()
    beat_init.send(sender=None)
    try:  # no worker yet: the message waits past its expiry, as behind a backlog
        celery.send_task(BEAT_HEARTBEAT_TASK, queue=BEAT_HEARTBEAT_QUEUE, expires=0.5)
        sent_at = time.time()
    finally:
        before_task_publish.disconnect(dispatch_uid="tasklab.observe.beat.publish")
        celery.close()
    time.sleep(1.0)  # let it expire before any worker sees it
    port = free_port_on("127.0.0.1")
    worker = worker_factory(settings, concurrency=1, queues=BEAT_HEARTBEAT_QUEUE, name="late")
    worker.argv += ["--metrics-port", str(port)]
    worker.start()

    labels = {"task": BEAT_HEARTBEAT_TASK, "queue": BEAT_HEARTBEAT_QUEUE}
    samples = wait_until(
        lambda: scrape(port),
        lambda s: value(s, f"{WAIT}_count", **labels) == 1,
        timeout_s=30,
        what="the expired heartbeat's wait",
    )
    waited_s = value(samples, f"{WAIT}_sum", **labels) or 0.0
    assert 1.0 <= waited_s <= time.time() - sent_at
