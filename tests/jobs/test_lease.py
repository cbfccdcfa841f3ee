"""Leases: renewed in time however long the keeper slept, set by the database's clock, and a
renewal that finds the row taken back turns the attempt into a zombie that records nothing."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from tasklab.database import writing
from tasklab.errors import StaleAttempt
from tasklab.jobs import JobManager, JobStatus, execution, lease, reaper_sql, store
from tasklab.jobs.execution import Executor, JobContext
from tasklab.jobs.lease import LeaseKeeper
from tasklab.lab import probe_jobs
from tasklab.settings import Settings
from tests.support.schema import migrated


@pytest.fixture
def jm(tmp_path: Path, database_url: str | None) -> Iterator[JobManager]:
    settings = Settings(home_dir=tmp_path / ".tasklab", database_url=database_url)
    migrated(settings)
    manager = JobManager(settings, local_fallback=False)
    yield manager
    manager.close()


def claimed(jm: JobManager, lease_s: float) -> str:
    prepared = jm.prepare(probe_jobs.noop)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
        claim = store.claim(prepared.id, lease_owner="t", lease_s=lease_s, via="broker", now=0.0)
        assert conn.execute(*claim).first() is not None
    return prepared.id


def expires_in_s(jm: JobManager, job_id: str) -> float:
    with jm.engine.connect() as conn:
        row = conn.execute(
            sa.select(store.jobs.c.lease_expires_at - store.db_now()).where(
                store.jobs.c.id == job_id
            )
        ).scalar_one()
    return float(row)


def test_a_short_lease_is_renewed_in_time_after_an_idle_spell(jm: JobManager) -> None:
    keeper = LeaseKeeper(jm.engine)
    idle = claimed(jm, 30.0)
    keeper.hold(idle, 1, 30.0)  # the keeper's thread now sleeps a third of 30 s
    keeper.release(idle)
    time.sleep(0.2)
    short = claimed(jm, 1.5)

    keeper.hold(short, 1, 1.5)
    time.sleep(2.5)

    assert expires_in_s(jm, short) > 0, "the 1.5 s lease ran out while its job ran"
    keeper.release(short)


def test_leases_are_set_by_the_database_clock_not_the_hosts(
    jm: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = jm.prepare(probe_jobs.noop)
    with writing(jm.engine) as conn:
        conn.execute(*prepared.insert)
    skewed = time.time() + 3600  # this host's clock is an hour ahead
    monkeypatch.setattr(execution.time, "time", lambda: skewed)
    executor = Executor(
        jm.engine,
        lease_owner="skewed",
        via="broker",
        default_lease_s=10,
        leases=LeaseKeeper(jm.engine),
        reschedule=lambda *a: None,
    )

    claim = executor._claim(probe_jobs.noop, prepared.id)

    assert claim is not None
    assert 5 < expires_in_s(jm, prepared.id) <= 10.5


def test_a_renewal_that_finds_the_row_taken_back_stops_the_attempt(
    jm: JobManager, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = LeaseKeeper(jm.engine)
    job_id = claimed(jm, -1.0)  # already expired: the reaper takes it back
    keeper.hold(job_id, 1, 5.0)
    with writing(jm.engine) as conn:
        assert conn.execute(reaper_sql.release_expired(job_id, 1, time.time(), dead=False)).first()
    ctx = JobContext(
        id=job_id,
        task=probe_jobs.noop.name,
        queue="default",
        attempt=1,
        max_attempts=3,
        engine=jm.engine,
        lease_s=5,
        leases=keeper,
    )

    with caplog.at_level(logging.WARNING, logger="tasklab.jobs.lease"):
        assert keeper.renew_now() == 0

    assert keeper.lost(job_id, 1)
    assert "lost its lease" in caplog.text
    with pytest.raises(StaleAttempt, match=f"job {job_id} attempt 1 lost its lease"):
        ctx.progress(1, 2)
    with (
        pytest.raises(StaleAttempt, match="lost its claim; effects rolled back"),
        ctx.transaction() as session,
    ):
        session.execute(store.jobs.update().where(store.jobs.c.id == job_id).values(owner="z"))
    assert jm.get(job_id).owner == ""  # the zombie's write was rolled back
    assert jm.get(job_id).status is JobStatus.PENDING
    keeper.release(job_id)


def cancel_with_terminate(jm: JobManager, job_id: str) -> None:
    with writing(jm.engine) as conn:
        conn.execute(store.request_cancel_running(job_id, now=time.time(), terminate=True))


def test_a_keeper_outside_a_pool_process_never_ends_its_process(jm: JobManager) -> None:
    """The API's local executor holds leases too: a cancel with terminate makes the attempt a
    zombie there, and the process (serving requests) lives on."""
    keeper = LeaseKeeper(jm.engine)  # terminate_self=False
    job_id = claimed(jm, 30.0)
    keeper.hold(job_id, 1, 30.0)
    cancel_with_terminate(jm, job_id)

    assert keeper.renew_now() == 0
    assert keeper.lost(job_id, 1)  # and this process is still here to say so
    keeper.release(job_id)
    assert not keeper.lost(job_id, 1)


def ends_of_a_forked_keeper(jm: JobManager, job_id: str) -> int:
    """Hold ``job_id`` in a forked child's pool-process keeper and renew once: the signal
    that ended the child, or 0 if it lived on."""
    pid = os.fork()
    if pid == 0:  # the child: renew, then leave without the parent's atexit
        try:
            keeper = LeaseKeeper(jm.engine, terminate_self=True)
            keeper.hold(job_id, 1, 30.0)
            keeper.renew_now()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 3, status
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def test_a_pool_process_ends_only_while_it_runs_a_job_cancelled_with_terminate(
    jm: JobManager,
) -> None:
    taken_back = claimed(jm, -1.0)  # the reaper takes it back: lost, but not cancelled
    with writing(jm.engine) as conn:
        assert conn.execute(
            reaper_sql.release_expired(taken_back, 1, time.time(), dead=False)
        ).first()
    keeper = LeaseKeeper(jm.engine, terminate_self=True)
    keeper.hold(taken_back, 1, 30.0)
    assert keeper.renew_now() == 0
    assert keeper.lost(taken_back, 1)  # a zombie here, and this process lives on
    keeper.release(taken_back)

    cancelled = claimed(jm, 30.0)
    cancel_with_terminate(jm, cancelled)
    assert ends_of_a_forked_keeper(jm, cancelled) == signal.SIGKILL


def test_a_renewal_counts_the_leases_still_held_and_extends_each(jm: JobManager) -> None:
    keeper = LeaseKeeper(jm.engine)
    assert keeper.renew_now() == 0  # nothing held
    ours = [claimed(jm, 2.0) for _ in range(2)]
    gone = claimed(jm, -1.0)
    with writing(jm.engine) as conn:  # the reaper took this one back
        assert conn.execute(reaper_sql.release_expired(gone, 1, time.time(), dead=False)).first()
    for job_id in [*ours, gone]:
        keeper.hold(job_id, 1, 20.0)

    assert keeper.renew_now() == 2
    assert all(15 < expires_in_s(jm, job_id) <= 20.5 for job_id in ours)
    assert keeper.lost(gone, 1) and not any(keeper.lost(job_id, 1) for job_id in ours)
    for job_id in [*ours, gone]:
        keeper.release(job_id)


def test_the_keeper_sleeps_until_a_third_of_the_shortest_lease_has_passed(
    jm: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schedule alone (no thread runs it here): idle, IDLE_WAIT_S; holding, until a third
    of the shortest lease since the claim or the last renewal; overdue, not at all; in a pool
    process, at most TERMINATE_POLL_S (a cancel with terminate is polled that often)."""
    keeper = LeaseKeeper(jm.engine)
    pool = LeaseKeeper(jm.engine, terminate_self=True)
    for k in (keeper, pool):
        monkeypatch.setattr(k, "_ensure_thread", lambda: None)
    assert keeper._next_wait() == lease.IDLE_WAIT_S

    keeper.hold("a", 1, 30.0)
    assert 9.0 < keeper._next_wait() <= 10.0
    keeper.hold("b", 1, 6.0)  # its first renewal is due with a's: from a's claim on
    assert 1.0 < keeper._next_wait() <= 2.0
    pool.hold("a", 1, 30.0)
    assert 0.5 < pool._next_wait() <= lease.TERMINATE_POLL_S

    overdue = LeaseKeeper(jm.engine)
    monkeypatch.setattr(overdue, "_ensure_thread", lambda: None)
    overdue.hold("c", 1, 0.03)
    time.sleep(0.05)
    assert overdue._next_wait() == 0.0


def lease_renewed_within(jm: JobManager, job_id: str, s: float) -> bool:
    """Whether the lease of a job claimed for 600 s is renewed (for less) within ``s``."""
    deadline = time.monotonic() + s
    while time.monotonic() < deadline:
        if expires_in_s(jm, job_id) < 300:
            return True
        time.sleep(0.05)
    return False


def test_a_shorter_lease_wakes_a_sleeping_keeper_which_renews_it_a_third_of_it_later(
    jm: JobManager,
) -> None:
    keeper = LeaseKeeper(jm.engine)
    long_job, short_job = claimed(jm, 600.0), claimed(jm, 600.0)
    keeper.hold(long_job, 1, 30.0)  # the thread sleeps 10 s
    keeper.hold(short_job, 1, 6.0)  # due in 2 s: the thread wakes, renews nothing yet

    time.sleep(0.5)
    assert expires_in_s(jm, long_job) > 500 and expires_in_s(jm, short_job) > 500
    assert lease_renewed_within(jm, short_job, 7.0), "renewed only when the 10 s sleep ended"
    assert expires_in_s(jm, short_job) <= 6.0 and expires_in_s(jm, long_job) <= 30.0
    keeper.release(long_job)
    keeper.release(short_job)


def test_a_keeper_keeps_its_one_thread_through_idle_spells(jm: JobManager) -> None:
    keeper = LeaseKeeper(jm.engine)
    job_id = claimed(jm, 600.0)
    keeper.hold(job_id, 1, 0.3)
    thread = keeper._thread
    keeper.release(job_id)
    time.sleep(0.3)  # the thread woke at 0.1 s to nothing held: idle now

    assert thread is not None and thread.is_alive()
    keeper.hold(job_id, 1, 3.0)
    assert keeper._thread is thread
    keeper.release(job_id)


def test_a_pool_keeper_polls_for_a_cancel_with_terminate_between_renewals(
    jm: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's lease is renewed every 10 s; the cancel ends the process within the poll.
    The keeper's kill is recorded instead of sent (the real one: the test above), so that
    the loop runs in this process."""
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(
        lease, "os", SimpleNamespace(getpid=os.getpid, kill=lambda *a: kills.append(a))
    )
    keeper = LeaseKeeper(jm.engine, terminate_self=True)
    job_id = claimed(jm, 30.0)
    keeper.hold(job_id, 1, 30.0)
    time.sleep(0.2)
    assert kills == []  # not cancelled yet

    cancel_with_terminate(jm, job_id)
    deadline = time.monotonic() + 5.0
    while not kills and time.monotonic() < deadline:
        time.sleep(0.05)
    keeper.release(job_id)
    assert kills[:1] == [(os.getpid(), signal.SIGKILL)]
