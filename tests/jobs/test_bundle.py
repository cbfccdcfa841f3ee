"""Bundles: jobs of one task, queue and priority in one broker message, run one after the
other by one worker, the rest handed back past the budget. Against a real Redis and SQL."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasklab.database import writing
from tasklab.embedded import EmbeddedRedis
from tasklab.errors import BrokerUnavailable
from tasklab.jobs import JobManager, JobSpec, JobStatus, job
from tasklab.jobs.execution import Executor, JobContext, Outcome
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.publisher import BUNDLE_TASK, Outgoing, Publisher
from tasklab.jobs.records import jobs
from tasklab.jobs.worker_side import WorkerRuntime
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.conftest import required_url
from tests.jobs.conftest import effect_counts, queue_lists, queued_messages
from tests.support.schema import migrated

NOOP = probe_jobs.noop.name
EFFECT = probe_jobs.effect.name


@job(name="tests.bundle.limited", time_limit_s=30)
def limited() -> None:
    """Never run: a job with a Celery time limit, which must not share a message."""


@job(name="tests.bundle.soft_limited", soft_time_limit_s=30)
def soft_limited() -> None:
    """Never run: as ``limited``, with a soft time limit."""


# --- broker messages ------------------------------------------------------------------------


def _queued(client: redis.Redis, queue: str) -> int:
    return sum(int(client.llen(key)) for key in queue_lists(client, queue))


def _bundles(client: redis.Redis, queue: str) -> list[list[Any]]:
    return [args for task, _, args in queued_messages(client, queue) if task == BUNDLE_TASK]


@pytest.fixture
def client(broker: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(broker.url)
    yield c
    c.close()


@pytest.fixture
def publishers(tmp_path: Path, broker: EmbeddedRedis) -> Iterator[Callable[..., Publisher]]:
    made: list[Publisher] = []

    def make(**settings: Any) -> Publisher:
        home = tmp_path / ".tasklab"
        p = Publisher(Settings(home_dir=home, redis_url=broker.url, **settings))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_bundled_jobs_of_one_task_queue_and_priority_travel_in_one_message(
    publishers, client: redis.Redis
) -> None:
    jobs = [f"job-{i}" for i in range(5)]
    ids = publishers().publish_many([Outgoing(NOOP, j, "low", 3, bundle=True) for j in jobs])

    assert _queued(client, "low") == 1
    [(task, message_id, args)] = queued_messages(client, "low")
    assert task == BUNDLE_TASK
    assert args == [NOOP, jobs, "low", 3]
    assert ids == [message_id] * 5  # each job is carried by the bundle's message


def test_bundles_are_split_by_bundle_max(publishers, client: redis.Redis) -> None:
    jobs = [f"job-{i}" for i in range(5)]
    messages = [Outgoing(NOOP, j, "low", 0, message_id=f"m-{j}", bundle=True) for j in jobs]
    ids = publishers(bundle_max=2).publish_many(messages)

    found = {
        tuple(args[1]) if task == BUNDLE_TASK else tuple(args): (task, mid)
        for task, mid, args in queued_messages(client, "low")
    }
    assert set(found) == {("job-0", "job-1"), ("job-2", "job-3"), ("job-4",)}
    assert found[("job-4",)] == (NOOP, "m-job-4")  # a chunk of one is a plain message
    first, second = found[("job-0", "job-1")][1], found[("job-2", "job-3")][1]
    assert first != second
    assert ids == [first, first, second, second, "m-job-4"]


def test_different_tasks_queues_and_priorities_are_separate_messages(
    publishers, client: redis.Redis
) -> None:
    groups = [(NOOP, "low", 0), (NOOP, "low", 9), (NOOP, "high", 0), (EFFECT, "low", 0)]
    messages = [
        Outgoing(task, f"{task}-{queue}-{prio}-{i}", queue, prio, bundle=True)
        for i in range(2)
        for task, queue, prio in groups
    ]
    ids = publishers().publish_many(messages)

    low, high = _bundles(client, "low"), _bundles(client, "high")
    assert len(low) == 3 and len(high) == 1 and _queued(client, "low") == 3
    for task, queue, prio in groups:
        expected = [task, [f"{task}-{queue}-{prio}-{i}" for i in range(2)], queue, prio]
        assert expected in (low if queue == "low" else high)
    assert len(set(ids)) == 4
    for i, m in enumerate(messages):  # jobs of one group share their message id
        same = {
            ids[k]
            for k, o in enumerate(messages)
            if (o.task, o.queue, o.priority) == (m.task, m.queue, m.priority)
        }
        assert same == {ids[i]}


def test_jobs_with_a_countdown_or_not_bundleable_are_never_bundled(
    publishers, client: redis.Redis
) -> None:
    plain = [Outgoing(NOOP, f"plain-{i}", "low", 0) for i in range(3)]
    delayed = [
        Outgoing(NOOP, f"later-{i}", "low", 0, countdown_s=30, bundle=True) for i in range(3)
    ]
    ids = publishers().publish_many([*plain, *delayed])

    found = queued_messages(client, "low")
    assert len(found) == 6 and len(set(ids)) == 6
    assert {task for task, _, _ in found} == {NOOP}
    assert sorted(args[0] for _, _, args in found) == sorted(o.job_id for o in [*plain, *delayed])
    assert {mid for _, mid, _ in found} == set(ids)


def test_bundle_max_of_one_turns_bundling_off(publishers, client: redis.Redis) -> None:
    ids = publishers(bundle_max=1).publish_many(
        [Outgoing(NOOP, f"job-{i}", "low", 0, bundle=True) for i in range(3)]
    )
    assert len(set(ids)) == 3
    assert [task for task, _, _ in queued_messages(client, "low")] == [NOOP] * 3


def test_publish_bundle_sends_one_message_with_the_job_ids(publishers, client: redis.Redis) -> None:
    message_id = publishers().publish_bundle(EFFECT, ["a", "b", "c"], "low", 2)
    assert queued_messages(client, "low") == [
        (BUNDLE_TASK, message_id, [EFFECT, ["a", "b", "c"], "low", 2])
    ]


# --- JobSpec.bundles ------------------------------------------------------------------------


def test_only_jobs_without_a_time_limit_may_share_a_message() -> None:
    assert probe_jobs.noop.bundles and probe_jobs.effect.bundles
    assert isinstance(limited, JobSpec) and limited.bundles is False
    assert isinstance(soft_limited, JobSpec) and soft_limited.bundles is False


# --- submit() through the relay, then a real worker -----------------------------------------


@pytest.fixture
def bundle_settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=broker.url,
        database_url=database_url,
        worker_concurrency=2,
        lease_s=5,
        reaper_interval_s=0.3,
        requeue_after_s=30,
        breaker_reset_s=0.3,
        local_workers=0,  # a job the broker refused would wait, not run here
    )
    migrated(settings)
    return settings


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_submitted_jobs_share_messages_and_each_runs_exactly_once(
    bundle_settings: Settings, client: redis.Redis, worker_factory
) -> None:
    jm = JobManager(bundle_settings)
    ids = [jm.submit(probe_jobs.effect).id for _ in range(30)]
    assert jm.flush(timeout_s=10)

    on_queue = queued_messages(client, "default")
    carried = [
        job_id
        for task, _, args in on_queue
        for job_id in (args[1] if task == BUNDLE_TASK else args)
    ]
    assert sorted(carried) == sorted(ids)  # every job once, in some message
    assert len(on_queue) < len(ids)  # and some shared one
    assert {jm.get(i).status for i in ids} == {JobStatus.QUEUED}

    worker_factory(bundle_settings).start()
    wait_until(lambda: all(jm.get(i).done for i in ids), 60, "the jobs to finish")
    finished = [jm.get(i) for i in ids]
    assert {j.status for j in finished} == {JobStatus.SUCCEEDED}
    assert {j.attempt for j in finished} == {1}
    assert all(j.result and j.result["attempt"] == 1 for j in finished)
    assert effect_counts(jm) == dict.fromkeys(ids, 1)
    jm.close()


def test_submitted_jobs_with_a_time_limit_each_get_a_message(
    bundle_settings: Settings, client: redis.Redis
) -> None:
    jm = JobManager(bundle_settings)
    ids = [jm.submit(limited).id for _ in range(10)]
    assert jm.flush(timeout_s=10)
    on_queue = queued_messages(client, "default")
    assert sorted(args for _, _, args in on_queue) == sorted([i] for i in ids)
    assert {task for task, _, _ in on_queue} == {limited.name}
    jm.close()


# --- Executor.run_bundle --------------------------------------------------------------------


class HandBacks:
    """The executor's ``hand_back``: records each call, then raises ``error`` if set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, list[str], str, int]] = []
        self.error = error

    def __call__(self, task: str, job_ids: list[str], queue: str, priority: int) -> None:
        self.calls.append((task, list(job_ids), queue, priority))
        if self.error is not None:
            raise self.error


@pytest.fixture
def db_settings(tmp_path: Path, database_url: str | None) -> Settings:
    settings = Settings(home_dir=tmp_path / ".tasklab", database_url=database_url, lease_s=5)
    migrated(settings)
    return settings


@pytest.fixture
def jm(db_settings: Settings) -> Iterator[JobManager]:
    manager = JobManager(db_settings, local_fallback=False)
    yield manager
    manager.close()


def insert(jm: JobManager, spec: JobSpec, kwargs: list[dict[str, Any]]) -> list[str]:
    """Job rows committed as submit() would, without publishing them."""
    prepared = [jm.prepare(spec, **kw) for kw in kwargs]
    with writing(jm.engine) as conn:
        for p in prepared:
            conn.execute(*p.insert)
    return [p.id for p in prepared]


def executor(
    jm: JobManager,
    hand_back: Any = None,
    budget_s: float = 30.0,
    queue_busy: Callable[[str], bool] | None = None,
) -> Executor:
    return Executor(
        jm.engine,
        lease_owner="bundle-test",
        via="broker",
        default_lease_s=5,
        leases=LeaseKeeper(jm.engine),
        reschedule=lambda *a: None,
        hand_back=hand_back,
        bundle_budget_s=budget_s,
        queue_busy=queue_busy,
    )


def test_run_bundle_records_every_job_including_the_last_carried_completion(
    jm: JobManager,
) -> None:
    ids = insert(jm, probe_jobs.noop, [{"sent_at": float(i)} for i in range(5)])
    hand_backs = HandBacks()

    outcomes = executor(jm, hand_backs).run_bundle(
        probe_jobs.noop, ids, queue="default", priority=5
    )

    assert [o.status for o in outcomes] == ["succeeded"] * 5
    for i, job_id in enumerate(ids):
        done = jm.get(job_id)
        assert done.status is JobStatus.SUCCEEDED, (i, done.status)
        assert done.attempt == 1 and done.via == "broker"
        assert done.result is not None and done.result["sent_at"] == float(i)
        assert done.finished_at is not None
    assert hand_backs.calls == []


def test_a_bundled_jobs_completion_is_handed_on_to_ride_with_the_next_claim(
    jm: JobManager,
) -> None:
    """run_bundle defers each success's completion to the next claim's transaction (the
    last one to the end of the bundle); run() writes its own at once."""
    ids = insert(jm, probe_jobs.noop, [{}] * 4)
    run = executor(jm)

    outcomes = run.run_bundle(probe_jobs.noop, ids[:3], queue="default", priority=5)
    single = run.run(probe_jobs.noop, ids[3])

    assert [o.completion[1]["p_id"] if o.completion else None for o in outcomes] == ids[:3]
    assert single == Outcome("succeeded")
    assert all(jm.get(i).status is JobStatus.SUCCEEDED for i in ids)


@job(name="tests.bundle.taken_back_if", bind=True)
def taken_back_if(ctx: JobContext, taken_back: bool) -> None:
    if taken_back:  # a reaper took the job back while it ran (its lease ran out)
        with writing(ctx.engine) as conn:
            conn.execute(jobs.update().where(jobs.c.id == ctx.id).values(status="PENDING"))


def test_a_carried_completion_that_lost_its_claim_is_dropped_and_the_bundle_goes_on(
    jm: JobManager, caplog: pytest.LogCaptureFixture
) -> None:
    ids = insert(jm, taken_back_if, [{"taken_back": i in (0, 2)} for i in range(3)])

    with caplog.at_level(logging.WARNING, logger="tasklab.jobs.execution"):
        outcomes = executor(jm).run_bundle(taken_back_if, ids, queue="default", priority=5)

    assert [o.status for o in outcomes] == ["succeeded"] * 3
    assert [jm.get(i).status for i in ids] == [
        JobStatus.PENDING,
        JobStatus.SUCCEEDED,
        JobStatus.PENDING,  # the last one's completion, written at the end, is dropped too
    ]
    dropped = [r.getMessage() for r in caplog.records if "result dropped" in r.getMessage()]
    assert dropped == [
        f"job {ids[i]} attempt 1 finished after losing its claim; result dropped" for i in (0, 2)
    ]


def test_run_bundle_commits_each_jobs_effects_once(jm: JobManager) -> None:
    ids = insert(jm, probe_jobs.effect, [{}] * 4)
    outcomes = executor(jm).run_bundle(probe_jobs.effect, ids, queue="default", priority=5)
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    assert [(jm.get(i).result or {}).get("attempt") for i in ids] == [1] * 4
    assert effect_counts(jm) == dict.fromkeys(ids, 1)


def test_run_bundle_skips_cancelled_jobs_and_still_records_the_ones_before(
    jm: JobManager,
) -> None:
    ids = insert(jm, probe_jobs.noop, [{"sent_at": float(i)} for i in range(5)])
    for cancelled in (ids[2], ids[4]):  # the completion of ids[1] and ids[3] rides on them
        assert jm.cancel(cancelled).status is JobStatus.CANCELLED

    outcomes = executor(jm).run_bundle(probe_jobs.noop, ids, queue="default", priority=5)

    assert [o.status for o in outcomes] == [
        "succeeded",
        "succeeded",
        "skipped",
        "succeeded",
        "skipped",
    ]
    statuses = [jm.get(i).status for i in ids]
    assert statuses == [JobStatus.SUCCEEDED] * 2 + [JobStatus.CANCELLED] + [
        JobStatus.SUCCEEDED,
        JobStatus.CANCELLED,
    ]
    assert jm.get(ids[2]).attempt == 0 and jm.get(ids[4]).attempt == 0


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_without_a_hand_back_a_bundle_past_its_budget_runs_here_and_nothing_watches_it(
    jm: JobManager,
) -> None:
    ids = insert(jm, probe_jobs.effect, [{"hold_s": 0.15}] * 3)
    outcomes = executor(jm, None, budget_s=0.1).run_bundle(
        probe_jobs.effect, ids, queue="default", priority=5
    )
    assert [o.status for o in outcomes] == ["succeeded"] * 3
    assert effect_counts(jm) == dict.fromkeys(ids, 1)


def test_past_the_budget_the_jobs_not_started_are_handed_back(jm: JobManager) -> None:
    ids = insert(jm, probe_jobs.effect, [{"hold_s": 1.0}, {}, {}, {}])
    hand_backs = HandBacks()

    outcomes = executor(jm, hand_backs, budget_s=0.4).run_bundle(
        probe_jobs.effect, ids, queue="default", priority=4
    )

    assert hand_backs.calls == [(EFFECT, ids[1:], "default", 4)]
    assert [o.status for o in outcomes] == ["succeeded"]  # the job running when it fired
    assert jm.get(ids[0]).status is JobStatus.SUCCEEDED
    for job_id in ids[1:]:  # left to whoever gets the new bundle
        left = jm.get(job_id)
        assert left.status is JobStatus.PENDING and left.attempt == 0
    assert effect_counts(jm) == {ids[0]: 1}


def test_a_bundle_of_two_hands_back_its_second_job_past_the_budget(jm: JobManager) -> None:
    ids = insert(jm, probe_jobs.effect, [{"hold_s": 1.0}, {}])
    hand_backs = HandBacks()
    outcomes = executor(jm, hand_backs, budget_s=0.4).run_bundle(
        probe_jobs.effect, ids, queue="default", priority=4
    )
    assert hand_backs.calls == [(EFFECT, ids[1:], "default", 4)]
    assert [o.status for o in outcomes] == ["succeeded"]
    assert jm.get(ids[1]).status is JobStatus.PENDING


def test_jobs_the_broker_does_not_take_back_run_here(jm: JobManager) -> None:
    ids = insert(jm, probe_jobs.effect, [{"hold_s": 1.0}, {}, {}, {}])
    hand_backs = HandBacks(BrokerUnavailable("broker circuit is open"))

    outcomes = executor(jm, hand_backs, budget_s=0.4).run_bundle(
        probe_jobs.effect, ids, queue="default", priority=4
    )

    assert hand_backs.calls == [(EFFECT, ids[1:], "default", 4)]
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    assert {jm.get(i).status for i in ids} == {JobStatus.SUCCEEDED}
    assert effect_counts(jm) == dict.fromkeys(ids, 1)


def test_while_the_queue_has_messages_waiting_the_bundle_keeps_its_jobs(
    jm: JobManager,
) -> None:
    """Under a backlog every worker has work: handing back would only send jobs that waited
    their turn to the back of the queue again, pass after pass."""
    ids = insert(jm, probe_jobs.effect, [{"hold_s": 0.5}] * 4)
    hand_backs = HandBacks()
    asked: list[str] = []

    def busy(queue: str) -> bool:
        asked.append(queue)
        return True

    outcomes = executor(jm, hand_backs, budget_s=0.2, queue_busy=busy).run_bundle(
        probe_jobs.effect, ids, queue="low", priority=4
    )

    assert hand_backs.calls == []
    assert len(asked) >= 3 and set(asked) == {"low"}  # asked again after each budget
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    assert effect_counts(jm) == dict.fromkeys(ids, 1)


def test_once_the_queue_is_empty_the_rest_is_handed_back(jm: JobManager) -> None:
    ids = insert(jm, probe_jobs.effect, [{"hold_s": 0.5}] * 5)
    hand_backs = HandBacks()

    def busy(queue: str) -> bool:
        # a backlog until two jobs ran (by their effects, not by the clock: a loaded machine
        # runs them late), then the queue is empty
        return sum(effect_counts(jm).values()) < 2

    outcomes = executor(jm, hand_backs, budget_s=0.2, queue_busy=busy).run_bundle(
        probe_jobs.effect, ids, queue="default", priority=4
    )

    assert len(hand_backs.calls) == 1
    _task, handed, _queue, _priority = hand_backs.calls[0]
    ran = len(outcomes)
    assert 2 <= ran < 5 and handed == ids[ran:]
    assert effect_counts(jm) == dict.fromkeys(ids[:ran], 1)


def test_a_queue_whose_depth_cannot_be_read_gets_the_rest_back(jm: JobManager) -> None:
    ids = insert(jm, probe_jobs.effect, [{"hold_s": 1.0}, {}, {}])
    hand_backs = HandBacks()

    def unreadable(queue: str) -> bool:
        raise redis.ConnectionError("refused")

    outcomes = executor(jm, hand_backs, budget_s=0.3, queue_busy=unreadable).run_bundle(
        probe_jobs.effect, ids, queue="default", priority=4
    )
    assert hand_backs.calls == [(EFFECT, ids[1:], "default", 4)]
    assert [o.status for o in outcomes] == ["succeeded"]


def test_a_worker_sees_whether_its_queue_has_messages_waiting(
    db_settings: Settings, broker: EmbeddedRedis
) -> None:
    settings = db_settings.model_copy(update={"redis_url": broker.url})
    runtime = WorkerRuntime(settings)
    publisher = Publisher(settings)
    try:
        assert runtime.queue_busy("low") is False
        publisher.publish(NOOP, "0" * 32, queue="low", priority=2)  # any priority's list
        assert runtime.queue_busy("low") is True
        assert runtime.queue_busy("default") is False
    finally:
        publisher.close()
        runtime.publisher.close()
        runtime.engine.dispose()


def test_on_rabbitmq_a_worker_sees_whether_its_queue_has_messages_waiting(
    db_settings: Settings,
) -> None:
    url = required_url("TEST_RABBITMQ_URL")
    queue = f"tasklab-test-{uuid.uuid4().hex[:8]}"
    settings = db_settings.model_copy(update={"broker_url": url, "extra_queues": [queue]})
    runtime = WorkerRuntime(settings)
    publisher = Publisher(settings)
    try:
        assert runtime.queue_busy(queue) is False
        publisher.publish(NOOP, "0" * 32, queue=queue, priority=5)
        deadline = time.monotonic() + 5
        while not runtime.queue_busy(queue) and time.monotonic() < deadline:
            time.sleep(0.05)  # publisher confirms are off: the broker counts it a bit later
        assert runtime.queue_busy(queue) is True
    finally:
        with publisher.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        publisher.close()
        runtime.publisher.close()
        runtime.engine.dispose()


def test_handed_back_jobs_reach_the_broker_as_one_bundle(
    db_settings: Settings, broker: EmbeddedRedis, client: redis.Redis
) -> None:
    settings = db_settings.model_copy(update={"redis_url": broker.url})
    manager = JobManager(settings, local_fallback=False)
    publisher = Publisher(settings)
    try:
        ids = insert(manager, probe_jobs.effect, [{"hold_s": 1.0}, {}, {}])
        outcomes = executor(manager, publisher.publish_bundle, budget_s=0.4).run_bundle(
            probe_jobs.effect, ids, queue="low", priority=5
        )
        assert [o.status for o in outcomes] == ["succeeded"]
        assert _bundles(client, "low") == [[EFFECT, ids[1:], "low", 5]]
    finally:
        publisher.close()
        manager.close()


def test_a_claimed_jobs_message_id_names_the_bundle_it_runs_from(jm: JobManager) -> None:
    """cancel(terminate=True) revokes the job's message_id: for a bundled job that must be
    the bundle's message, the one its worker runs."""
    ids = insert(jm, probe_jobs.noop, [{} for _ in range(3)])
    executor(jm).run_bundle(
        probe_jobs.noop, ids, queue="default", priority=5, message_id="bundle-message-1"
    )
    assert {jm.get(i).message_id for i in ids} == {"bundle-message-1"}
