"""Each way a job could be lost, against real servers: SIGKILLed workers, a stopped broker, a
broker restarted empty, duplicate and stale deliveries, a dead result backend."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tasklab.embedded import EmbeddedRedis
from tasklab.jobs import JobManager, JobStatus, reaper_sql
from tasklab.jobs.execution import Executor
from tasklab.jobs.lease import LeaseKeeper
from tasklab.jobs.recovery import Reaper
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.jobs.conftest import effect_counts, queued_messages
from tests.support.frozen import FrozenServer
from tests.support.schema import migrated


@pytest.fixture
def fault_settings(tmp_path: Path, broker: EmbeddedRedis, database_url: str | None) -> Settings:
    settings = Settings(
        home_dir=tmp_path / ".tasklab",
        redis_url=broker.url,
        database_url=database_url,
        worker_concurrency=2,
        lease_s=3,
        reaper_interval_s=0.3,
        requeue_after_s=2,
        breaker_reset_s=0.3,
        worker_prefetch_multiplier=1,
    )
    migrated(settings)
    return settings


def wait_until(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def publish_failures() -> Counter[str]:
    """tasklab_broker_publish_failures_total by reason, in this process."""
    return Counter(
        {
            sample.labels["reason"]: int(sample.value)
            for family in REGISTRY.collect()
            if family.name == "tasklab_broker_publish_failures"
            for sample in family.samples
            if sample.name.endswith("_total")
        }
    )


def ledger(jm: JobManager, ids: list[str]) -> dict[str, int]:
    statuses = [jm.get(i).status for i in ids]
    final = {JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED}
    return {
        "submitted": len(ids),
        "succeeded": statuses.count(JobStatus.SUCCEEDED),
        "dead": statuses.count(JobStatus.DEAD),
        "cancelled": statuses.count(JobStatus.CANCELLED),
        "lost": sum(s not in final for s in statuses),
    }


RECOVERY_DEFAULTS = ("lease_s", "requeue_after_s", "reaper_interval_s")
PRODUCTION_RECOVERY = {name: Settings.model_fields[name].default for name in RECOVERY_DEFAULTS}
# The defaults at a third of their scale (30, 15, 5 s): the same order of events in seconds.
THIRD_RECOVERY = {name: value / 3 for name, value in PRODUCTION_RECOVERY.items()}


@pytest.mark.parametrize(
    ("database_url", "recovery"),
    [
        ("sqlite", THIRD_RECOVERY),
        # On the defaults a killed attempt waits out a 30 s lease: make test-long. make test
        # SIGKILLs a worker node on the defaults too, in the soak (tests/lab/test_soak.py).
        pytest.param("sqlite", PRODUCTION_RECOVERY, marks=pytest.mark.long),
        pytest.param("postgres", PRODUCTION_RECOVERY, marks=pytest.mark.long),
    ],
    ids=["sqlite-third-of-defaults", "sqlite-defaults", "postgres-defaults"],
    indirect=["database_url"],
)
@pytest.mark.slow
def test_a_job_whose_worker_is_sigkilled_mid_task_completes_exactly_once(
    fault_settings: Settings, worker_factory, recovery: dict[str, float]
) -> None:
    """On ``recovery``'s lease_s, requeue_after_s and reaper_interval_s: a job that was
    running restarts once its lease ran out (never while it held it); one whose message the
    dead worker had reserved is published again once the message left the queue
    requeue_after_s ago. Every one runs again within lease_s + requeue_after_s +
    reaper_interval_s of the kill."""
    # two messages per process: the doomed worker also holds jobs it has not started
    settings = fault_settings.model_copy(update={**recovery, "worker_prefetch_multiplier": 2})
    bound_s = settings.lease_s + settings.requeue_after_s + settings.reaper_interval_s
    jm = JobManager(settings)
    first = worker_factory(settings, name="doomed").start()
    ids = [jm.submit(probe_jobs.effect, hold_s=2.0).id for _ in range(4)]
    wait_until(
        lambda: sum(jm.get(i).status is JobStatus.STARTED for i in ids) >= 2,
        30,
        "two jobs to start",
    )
    first.kill()
    killed_at = time.time()  # started_at is this host's clock too
    worker_factory(settings, name="rescuer").start()
    wait_until(lambda: all(jm.get(i).done for i in ids), bound_s + 30, "all jobs to finish")
    assert ledger(jm, ids) == {"submitted": 4, "succeeded": 4, "dead": 0, "cancelled": 0, "lost": 0}
    assert effect_counts(jm) == dict.fromkeys(ids, 1)  # no duplicate effects
    done = [jm.get(i) for i in ids]
    restarted_after_s = {j.id: (j.started_at or 0.0) - killed_at for j in done}
    assert max(restarted_after_s.values()) < bound_s, restarted_after_s
    rerun = [j for j in done if j.attempt >= 2]
    assert rerun, "no killed attempt was run again"
    # the lease was renewed every lease_s / 3 until the kill: it ran out no sooner than
    # 2/3 of a lease later (the reaper never took a job from a live lease)
    for j in rerun:
        assert restarted_after_s[j.id] > settings.lease_s * 2 / 3 - 1, restarted_after_s
    jm.close()


def test_a_long_job_is_not_redelivered_while_its_worker_is_alive(
    fault_settings: Settings, worker_factory
) -> None:
    settings = fault_settings.model_copy(update={"lease_s": 1.2})
    jm = JobManager(settings)
    worker_factory(settings).start()
    j = jm.submit(probe_jobs.effect, hold_s=3 * settings.lease_s)  # outlives 3 leases
    done = jm.wait(j.id, timeout_s=60)
    assert done.status is JobStatus.SUCCEEDED and done.attempt == 1
    assert effect_counts(jm) == {j.id: 1}
    jm.close()


def test_with_the_broker_down_jobs_run_locally_then_return_to_the_broker(
    fault_settings: Settings, broker: EmbeddedRedis, worker_factory
) -> None:
    jm = JobManager(fault_settings)
    port = broker.port
    broker.stop()
    t0 = time.monotonic()
    first = jm.submit(probe_jobs.effect)
    assert jm.flush(timeout_s=10)  # the relay's publish failed, the fallback took the job
    first_submit_s = time.monotonic() - t0
    assert jm.publisher.breaker.is_open
    refused_before = publish_failures()
    second = jm.submit(probe_jobs.effect)
    assert jm.flush(timeout_s=10)
    # once open, the circuit refuses the publish itself: no attempt reaches for the broker
    assert publish_failures() - refused_before == Counter({"circuit_open": 1})
    for j in (first, second):
        done = jm.wait(j.id, timeout_s=30)
        assert done.status is JobStatus.SUCCEEDED and done.via == "local"
    assert first_submit_s < 2.0  # publish fails fast: publish_timeout_s is 1 s
    # The broker comes back (empty), on the same port.
    broker.port = port
    broker.start()
    worker_factory(fault_settings).start()
    # The first submit after breaker_reset_s starts a probe in the background and runs
    # locally itself (it does not wait for the probe); the probe closes the circuit.
    time.sleep(fault_settings.breaker_reset_s)
    meanwhile = [jm.submit(probe_jobs.effect)]
    wait_until(lambda: not jm.publisher.breaker.is_open, 5, "the probe to close the circuit")
    back = jm.submit(probe_jobs.effect)
    assert jm.wait(back.id, timeout_s=30).via == "broker"
    assert jm.wait(meanwhile[0].id, timeout_s=30).status is JobStatus.SUCCEEDED
    ids = [first.id, second.id, meanwhile[0].id, back.id]
    assert effect_counts(jm) == dict.fromkeys(ids, 1)
    jm.close()


def test_jobs_the_local_executor_cannot_take_wait_in_sql_for_the_broker(
    fault_settings: Settings, broker: EmbeddedRedis, worker_factory
) -> None:
    settings = fault_settings.model_copy(update={"local_workers": 0})
    jm = JobManager(settings)
    port = broker.port
    broker.stop()
    ids = [jm.submit(probe_jobs.effect).id for _ in range(5)]
    assert jm.flush(timeout_s=10)
    assert {jm.get(i).status for i in ids} == {JobStatus.PENDING}
    broker.port = port
    broker.start()
    worker_factory(settings).start()  # its reaper publishes the PENDING jobs
    wait_until(lambda: all(jm.get(i).done for i in ids), 60, "pending jobs to run")
    assert ledger(jm, ids)["succeeded"] == 5
    assert effect_counts(jm) == dict.fromkeys(ids, 1)
    jm.close()


def test_queued_jobs_survive_a_broker_restarted_empty(
    fault_settings: Settings, broker: EmbeddedRedis, worker_factory
) -> None:
    jm = JobManager(fault_settings)
    ids = [jm.submit(probe_jobs.effect).id for _ in range(10)]
    assert jm.flush(timeout_s=10)  # their messages are in the broker
    port = broker.port
    broker.stop()  # Redis keeps nothing on disk: every queued message is gone
    broker.port = port
    broker.start()
    worker_factory(fault_settings).start()
    wait_until(lambda: all(jm.get(i).done for i in ids), 60, "lost messages to be re-published")
    assert ledger(jm, ids)["lost"] == 0
    assert effect_counts(jm) == dict.fromkeys(ids, 1)
    jm.close()


def test_the_reaper_republishes_at_once_when_it_sees_the_broker_flushed(
    fault_settings: Settings, broker: EmbeddedRedis
) -> None:
    import redis

    from tasklab.jobs.publisher import BUNDLE_TASK

    jm = JobManager(fault_settings)
    reaper = Reaper(
        fault_settings.model_copy(update={"requeue_after_s": 3600}), jm.engine, jm.publisher
    )
    reaper.tick()  # learns the broker's epoch
    ids = [jm.submit(probe_jobs.noop).id for _ in range(3)]
    assert jm.flush(timeout_s=10)
    client = redis.Redis.from_url(broker.url)
    client.flushall()
    counts = reaper.tick()
    assert counts["message_lost"] == 3
    carried = [
        job_id
        for task, _, args in queued_messages(client, "default")
        for job_id in (args[1] if task == BUNDLE_TASK else args)
    ]
    assert sorted(carried) == sorted(ids)  # once each, in as few messages as bundles allow
    assert {jm.get(i).publish_count for i in ids} == {2}
    client.close()
    reaper.close()
    jm.close()


def test_a_duplicate_delivery_is_skipped(fault_settings: Settings, worker_factory) -> None:
    jm = JobManager(fault_settings)
    j = jm.submit(probe_jobs.effect)
    jm.publisher.publish(probe_jobs.effect.name, j.id, queue="default", priority=5)
    worker_factory(fault_settings).start()
    assert jm.wait(j.id, timeout_s=30).attempt == 1
    marker = jm.submit(probe_jobs.effect)  # both messages consumed once this one is done
    jm.wait(marker.id, timeout_s=30)
    assert effect_counts(jm)[j.id] == 1
    jm.close()


def test_a_stale_attempt_cannot_commit_its_effects(
    fault_settings: Settings, broker: EmbeddedRedis
) -> None:
    """Attempt 1 loses its lease while still running; attempt 2 takes over. Attempt 1's
    transaction must then roll back: the fence on the attempt number."""
    from tasklab.jobs import store

    jm = JobManager(fault_settings)
    j = jm.submit(probe_jobs.effect)
    outcomes = []

    def stalled_then_commit(spec, job_id, *a, **k):
        return None

    def make(owner: str) -> Executor:
        return Executor(
            jm.engine,
            lease_owner=owner,
            via="broker",
            default_lease_s=0.2,
            leases=LeaseKeeper(jm.engine),
            reschedule=stalled_then_commit,
        )

    first = make("a")
    with jm.engine.begin() as conn:  # attempt 1 claims, then its lease lapses
        row = conn.execute(
            *store.claim(j.id, lease_owner="a", lease_s=-1.0, via="broker", now=time.time())
        ).first()
        assert row is not None and row.attempt == 1
        conn.execute(reaper_sql.release_expired(j.id, 1, time.time() + 1, dead=False))
    outcomes.append(make("b").run(probe_jobs.effect, j.id).status)  # attempt 2 completes
    from tasklab.jobs.execution import JobContext

    stale = JobContext(
        id=j.id,
        task=probe_jobs.effect.name,
        queue="default",
        attempt=1,
        max_attempts=5,
        engine=jm.engine,
        lease_s=1,
    )
    from tasklab.errors import StaleAttempt
    from tasklab.jobs.records import effects

    with pytest.raises(StaleAttempt), stale.transaction() as session:  # the fenced commit
        session.execute(effects.insert().values(job_id=j.id, attempt=1, created_at=0.0))
    assert outcomes == ["succeeded"]
    assert effect_counts(jm) == {j.id: 1}
    assert jm.get(j.id).attempt == 2
    del first
    jm.close()


def test_job_tasks_never_touch_the_result_backend_so_a_dead_one_drops_no_jobs(
    fault_settings: Settings, worker_factory
) -> None:
    """The outcome of a job is in SQL; its Celery task is declared (and published) with
    ignore_result. Guards against turning Celery results on for job tasks: a hung result
    backend would then hold every pool process after each job, and this test sees the
    worker connect to it."""
    backend = FrozenServer()
    settings = fault_settings.model_copy(
        update={"result_backend": f"redis://127.0.0.1:{backend.port}/0"}
    )
    jm = JobManager(settings)
    try:
        worker_factory(settings).start()
        ids = [jm.submit(probe_jobs.effect).id for _ in range(5)]
        ids.append(jm.submit(probe_jobs.fail, "boom").id)  # a failure stores no result either
        wait_until(lambda: all(jm.get(i).done for i in ids), 60, "jobs to finish")
        assert ledger(jm, ids) == {
            "submitted": 6,
            "succeeded": 5,
            "dead": 1,
            "cancelled": 0,
            "lost": 0,
        }
        assert effect_counts(jm) == dict.fromkeys(ids[:5], 1)
        assert backend.accepted == [], "a job task connected to the result backend"
    finally:
        backend.close()
        jm.close()


def test_a_frozen_broker_fails_the_publish_fast_and_the_job_runs_locally(
    fault_settings: Settings, broker: EmbeddedRedis
) -> None:
    import os
    import signal

    jm = JobManager(fault_settings)
    jm.submit(probe_jobs.noop, queue="low")  # connect while the broker answers
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        submitted_at = time.time()  # the job's started_at is set by this host's clock too
        j = jm.submit(probe_jobs.effect)
        done = jm.wait(j.id, timeout_s=30)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert done.status is JobStatus.SUCCEEDED and done.via == "local"
    # submit() returns before the relay publishes: what the socket timeout bounds is the
    # time until the job runs here (one publish_timeout_s, then the local executor's claim)
    assert done.started_at is not None
    running_after_s = done.started_at - submitted_at
    assert running_after_s < fault_settings.publish_timeout_s * 3
    assert done.attempt == 1
    jm.close()


def test_finished_jobs_past_retention_are_purged(fault_settings: Settings) -> None:
    from tasklab.jobs import store

    jm = JobManager(fault_settings)
    old = jm.submit(probe_jobs.noop, queue="low")
    fresh = jm.submit(probe_jobs.noop, queue="low")
    waiting = jm.submit(probe_jobs.noop, queue="low")
    with jm.engine.begin() as conn:
        for job_id, finished in ((old.id, 1.0), (fresh.id, time.time())):
            conn.execute(
                store.jobs.update()
                .where(store.jobs.c.id == job_id)
                .values(status="SUCCEEDED", finished_at=finished)
            )
    reaper = Reaper(fault_settings, jm.engine, jm.publisher)
    assert reaper.purge() == 1
    remaining = {j.id for j in jm.list(page_size=100)[0]}
    assert remaining == {fresh.id, waiting.id}
    reaper.close()
    jm.close()


def test_jobs_a_sigkilled_submitter_had_not_published_yet_still_run(
    fault_settings: Settings, worker_factory
) -> None:
    """submit() returns before its relay publishes: a submitting process killed in that
    window leaves PENDING rows (no message carries them), which the reaper publishes; the
    relay marked QUEUED exactly those it had published."""
    import os
    import subprocess
    import sys

    import redis

    from tasklab.jobs.publisher import BUNDLE_TASK

    script = (
        "import os, signal, sys\n"
        "from tasklab.jobs import JobManager\n"
        "from tasklab.lab import probe_jobs\n"
        "from tasklab.settings import Settings\n"
        "jm = JobManager(Settings.model_validate_json(sys.argv[1]))\n"
        "ids = [jm.submit(probe_jobs.effect).id for _ in range(20)]\n"
        "print(' '.join(ids), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # the relay is still lingering\n"
    )
    # A long linger keeps the relay's second batch in memory when the process dies.
    settings = fault_settings.model_copy(update={"relay_linger_ms": 1000})
    env = {**os.environ, "TASKLAB_IMPORTS": "[]"}
    done = subprocess.run(
        [sys.executable, "-c", script, settings.model_dump_json()],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 20
    client = redis.Redis.from_url(fault_settings.redis_url or "")
    carried = [
        job_id
        for task, _, args in queued_messages(client, "default")
        for job_id in (args[1] if task == BUNDLE_TASK else args)
    ]
    client.close()
    assert len(carried) < len(ids)  # some never reached the broker
    jm = JobManager(fault_settings)
    status = {i: jm.get(i).status for i in ids}
    # QUEUED only once a message carries it (the kill may land between the publish and the
    # mark: then a carried job is still PENDING, and published twice at worst)
    assert {i for i, st in status.items() if st is JobStatus.QUEUED} <= set(carried)
    assert {i for i, st in status.items() if st is JobStatus.PENDING} >= set(ids) - set(carried)
    worker_factory(fault_settings).start()  # its reaper re-publishes what never left
    wait_until(lambda: all(jm.get(i).done for i in ids), 60, "stranded jobs to run")
    assert ledger(jm, ids)["succeeded"] == 20
    assert effect_counts(jm) == dict.fromkeys(ids, 1)
    jm.close()
