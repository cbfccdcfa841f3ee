"""Relay: the thread that publishes behind submit(), driven here by a plain dispatch function."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tasklab.jobs.relay import STREAM_GAP_S, Relay


class Recorder:
    """A dispatch function that records each batch; ``block_on`` items hold their batch until
    ``release`` is set (``entered`` tells that such a batch is being dispatched)."""

    def __init__(self, *, block_on: Sequence[object] = (), fail_with: object = None) -> None:
        self.batches: list[list[object]] = []
        self.block_on = set(block_on)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_with = fail_with  # a callable(batch) -> outcomes, or None
        self._lock = threading.Lock()

    def __call__(self, batch: list[object]) -> list[object]:
        with self._lock:
            self.batches.append(list(batch))
        if self.block_on.intersection(batch):
            self.entered.set()
            assert self.release.wait(30), "the test never released the dispatch"
        if callable(self.fail_with):
            outcomes: list[object] = self.fail_with(batch)
            return outcomes
        return [None] * len(batch)

    @property
    def items(self) -> list[object]:
        with self._lock:
            return [item for batch in self.batches for item in batch]


@pytest.fixture
def relays() -> Iterator[Callable[..., Relay[object]]]:
    """Relays closed at the end of the test (their dispatch released first)."""
    made: list[tuple[Relay[object], Recorder]] = []

    def make(recorder: Recorder, **kwargs: Any) -> Relay[object]:
        relay: Relay[object] = Relay(recorder, exit_flush_s=0.1, **kwargs)  # type: ignore[arg-type]
        made.append((relay, recorder))
        return relay

    yield make
    for relay, recorder in made:
        recorder.release.set()
        relay.close(timeout_s=5)


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_items_put_while_a_dispatch_is_in_flight_go_out_together_next(relays) -> None:
    recorder = Recorder(block_on=["a"])
    relay = relays(recorder)
    relay.put("a")
    assert recorder.entered.wait(10)
    for item in ("b", "c", "d"):
        relay.put(item)
    recorder.release.set()
    assert relay.flush(timeout_s=10)
    assert recorder.batches == [["a"], ["b", "c", "d"]]


def test_a_backlog_goes_out_in_batches_of_at_most_max_batch_in_order(relays) -> None:
    recorder = Recorder(block_on=["first"])
    relay = relays(recorder, max_batch=3)
    relay.put("first")
    assert recorder.entered.wait(10)
    for i in range(7):
        relay.put(i)
    recorder.release.set()
    assert relay.flush(timeout_s=10)
    assert recorder.batches == [["first"], [0, 1, 2], [3, 4, 5], [6]]


def test_flush_returns_false_on_timeout_while_dispatch_blocks_then_true(relays) -> None:
    recorder = Recorder(block_on=["slow"])
    relay = relays(recorder)
    assert relay.flush(timeout_s=0.1)  # nothing put yet: nothing to wait for
    relay.put("slow")
    assert recorder.entered.wait(10)
    relay.put("behind")
    assert relay.flush(timeout_s=0.2) is False  # in flight, and one more pending
    recorder.release.set()
    assert relay.flush(timeout_s=10) is True
    assert recorder.items == ["slow", "behind"]


def test_a_dispatch_that_raises_is_logged_and_later_items_still_go_out(
    relays, caplog: pytest.LogCaptureFixture
) -> None:
    def boom_once(batch: list[object]) -> list[object]:
        if "boom" in batch:
            raise ConnectionError("broker said no")
        return [None] * len(batch)

    recorder = Recorder(fail_with=boom_once)
    relay = relays(recorder)
    with caplog.at_level(logging.ERROR, logger="tasklab.jobs.relay"):
        relay.put("boom")
        assert relay.flush(timeout_s=10)  # the failed batch is done with, not stuck
        relay.put("after")
        assert relay.flush(timeout_s=10)
    assert recorder.batches == [["boom"], ["after"]]
    failed = [r for r in caplog.records if r.name == "tasklab.jobs.relay"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "broker said no" in str(failed[0].exc_info[1])


def test_an_exception_returned_as_an_outcome_is_logged_and_later_items_still_go_out(
    relays, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse_x(batch: list[object]) -> list[object]:
        return [ValueError(f"refused {i}") if i == "x" else "ok" for i in batch]

    recorder = Recorder(fail_with=refuse_x)
    relay = relays(recorder)
    with caplog.at_level(logging.ERROR, logger="tasklab.jobs.relay"):
        relay.put("x")
        assert relay.flush(timeout_s=10)
        relay.put("y")
        assert relay.flush(timeout_s=10)
    assert recorder.items == ["x", "y"]
    messages = [r.getMessage() for r in caplog.records if r.name == "tasklab.jobs.relay"]
    assert len(messages) == 1 and "refused x" in messages[0]


def test_close_flushes_stops_the_thread_and_a_later_put_raises(relays) -> None:
    recorder = Recorder()
    relay = relays(recorder)
    for i in range(5):
        relay.put(i)
    assert relay.close(timeout_s=10) is True
    assert recorder.items == [0, 1, 2, 3, 4]
    thread = relay._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        relay.put(5)
    assert recorder.items == [0, 1, 2, 3, 4]


def test_close_that_times_out_still_dispatches_what_was_put_and_refuses_more(relays) -> None:
    recorder = Recorder(block_on=["slow"])
    relay = relays(recorder)
    relay.put("slow")
    assert recorder.entered.wait(10)
    relay.put("behind")
    assert relay.close(timeout_s=0.2) is False
    with pytest.raises(RuntimeError):
        relay.put("late")
    recorder.release.set()
    wait_until(lambda: recorder.items == ["slow", "behind"], 10, "the backlog to go out")
    assert relay.flush(timeout_s=10)


def test_a_relay_closed_before_any_put_refuses_puts(relays) -> None:
    recorder = Recorder()
    relay = relays(recorder)
    assert relay.close(timeout_s=1)
    with pytest.raises(RuntimeError, match="closed"):
        relay.put("late")


def _stream(relay: Relay[object], n: int, gap_s: float) -> None:
    for i in range(n):
        relay.put(i)
        time.sleep(gap_s)  # pacing of the stream, not a wait for a result


def test_with_linger_a_stream_of_puts_goes_out_in_fewer_batches(relays) -> None:
    n, gap_s = 30, 0.01  # a put every 10 ms: a stream (STREAM_GAP_S is 50 ms)
    assert gap_s < STREAM_GAP_S
    plain, lingering = Recorder(), Recorder()
    plain_relay = relays(plain)
    lingering_relay = relays(lingering, linger_s=0.2)
    _stream(plain_relay, n, gap_s)
    _stream(lingering_relay, n, gap_s)
    assert plain_relay.flush(timeout_s=10) and lingering_relay.flush(timeout_s=10)
    assert plain.items == lingering.items == list(range(n))
    # ~0.3 s of stream in batches of up to 0.2 s: a handful, against about one per put
    assert len(lingering.batches) <= n // 3, lingering.batches
    assert len(lingering.batches) < len(plain.batches)


def test_a_sparse_stream_is_not_held_back_by_the_linger(relays) -> None:
    """Puts 30 ms apart with a 40 ms linger: lingering would pair them and delay each by
    40 ms; they are further apart than half the linger, so each goes at once."""
    n, gap_s = 20, 0.03
    recorder = Recorder()
    relay = relays(recorder, linger_s=0.04)
    _stream(relay, n, gap_s)
    assert relay.flush(timeout_s=10)
    assert recorder.items == list(range(n))
    assert len(recorder.batches) >= n * 3 // 4, recorder.batches  # a late wake-up may pair two


def test_with_linger_a_single_put_after_idle_goes_out_promptly(relays) -> None:
    recorder = Recorder()
    relay = relays(recorder, linger_s=3.0)
    dispatched = threading.Event()
    recorder.fail_with = lambda batch: (dispatched.set(), [None] * len(batch))[1]
    relay.put("first")  # nothing went out before: not a stream
    assert dispatched.wait(1.5), "a lone put waited for the linger"
    assert relay.flush(timeout_s=10)
    time.sleep(STREAM_GAP_S * 3)  # idle: the last batch is older than the stream gap
    dispatched.clear()
    relay.put("second")
    assert dispatched.wait(1.5), "a put after idle waited for the linger"
    assert recorder.batches == [["first"], ["second"]]


class _Interleaving:
    """Stands in for the ``threading`` module inside tasklab.jobs.relay to force one
    interleaving of two threads' first ``put``: the first thread to build a Condition (it
    resets the relay) waits until a second one builds one too; that second one then waits
    until the first has queued its item and started the relay thread. A relay that lets
    only one thread reset it never makes the second call, and the first goes on after
    0.5 s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conditions = 0
        self._second_resetting = threading.Event()
        self._first_started = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(threading, name)

    def Condition(self, *args: object) -> threading.Condition:
        with self._lock:
            self._conditions += 1
            n = self._conditions
        if n == 1:
            self._second_resetting.wait(0.5)
        elif n == 2:
            self._second_resetting.set()
            self._first_started.wait(2)
        return threading.Condition(*args)  # type: ignore[arg-type]

    def Thread(self, *args: object, **kwargs: object) -> threading.Thread:
        self._first_started.set()
        return threading.Thread(*args, **kwargs)  # type: ignore[arg-type]


def test_concurrent_first_puts_lose_nothing(relays, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasklab.jobs import relay as relay_module

    recorder = Recorder()
    relay = relays(recorder)
    before = set(threading.enumerate())
    errors: list[BaseException | None] = []
    # a relay thread that crashes is one more error (not pytest's unhandled-thread warning)
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))

    def put(item: int) -> None:
        try:
            relay.put(item)
        except RuntimeError as e:  # a put that found the relay's condition swapped
            errors.append(e)

    with monkeypatch.context() as patch:
        patch.setattr(relay_module, "threading", _Interleaving())
        threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    relay.flush(timeout_s=2)
    relay.close(timeout_s=2)
    for t in set(threading.enumerate()) - before:  # the relay thread(s): ended or crashed
        t.join(2)
    assert errors == []
    assert sorted(recorder.items) == [0, 1]  # type: ignore[type-var]


def _exit_code(pid: int, timeout_s: float) -> int:
    """Reap a forked child; SIGKILL it (and fail) if it does not exit in time."""
    deadline = time.monotonic() + timeout_s
    while (reaped := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(reaped[1])


def test_after_fork_the_child_relay_starts_fresh(relays) -> None:
    recorder = Recorder(block_on=["in-flight"])
    relay = relays(recorder)
    relay.put("in-flight")
    assert recorder.entered.wait(10)
    relay.put("parent-pending")
    before = len(recorder.batches)
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's threads, items or in-flight batch
        code = 1
        try:
            relay.put("child")
            flushed = relay.flush(timeout_s=10)
            code = 0 if flushed and recorder.batches[before:] == [["child"]] else 2
        finally:
            os._exit(code)
    assert _exit_code(pid, timeout_s=30) == 0
    recorder.release.set()
    assert relay.flush(timeout_s=10)  # the parent's relay is unaffected
    assert recorder.batches == [["in-flight"], ["parent-pending"]]


class Settles:
    """A settle callback that counts its calls and notes which items were dispatched by then."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.seen: list[int] = []  # len(recorder.items) at each call
        self.fail_next = False

    def __call__(self) -> None:
        self.seen.append(len(self.recorder.items))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("settle failed")


def test_a_stream_of_batches_is_settled_once_per_interval_not_once_per_batch(relays) -> None:
    recorder = Recorder()
    settles = Settles(recorder)
    relay = relays(recorder, settle=settles, settle_every_s=0.25)  # type: ignore[arg-type]
    started = time.monotonic()
    _stream(relay, 60, 0.01)  # ~0.6 s of puts, about one batch each
    assert relay.flush(timeout_s=10)
    intervals = (time.monotonic() - started) / 0.25
    assert len(recorder.batches) >= 30, recorder.batches
    # one per interval of 0.25 s, and the flush's: a few, against one per batch
    assert 2 <= len(settles.seen) <= intervals + 2, (settles.seen, intervals)
    assert settles.seen[-1] == 60  # what flush waited for includes the last settle


def test_without_a_flush_the_last_batches_are_settled_within_the_interval(relays) -> None:
    recorder = Recorder()
    settles = Settles(recorder)
    relay = relays(recorder, settle=settles, settle_every_s=0.2)  # type: ignore[arg-type]
    relay.put("a")
    wait_until(lambda: recorder.items == ["a"], 5, "the dispatch")
    assert settles.seen == []  # not at once: a stream would have paid a write per batch
    wait_until(lambda: settles.seen == [1], 5, "the settle after its interval")


def test_flush_does_not_wait_for_the_interval_and_returns_after_the_settle(relays) -> None:
    recorder = Recorder()
    settles = Settles(recorder)
    relay = relays(recorder, settle=settles, settle_every_s=30.0)  # type: ignore[arg-type]
    relay.put("a")
    started = time.monotonic()
    assert relay.flush(timeout_s=10)
    assert settles.seen == [1]
    assert time.monotonic() - started < 10  # it did not wait the 30 s interval
    assert relay.flush(timeout_s=1) and settles.seen == [1]  # nothing new: no settle


def test_a_settle_that_raises_is_logged_and_the_next_one_still_runs(
    relays, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    settles = Settles(recorder)
    settles.fail_next = True
    relay = relays(recorder, settle=settles, settle_every_s=30.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="tasklab.jobs.relay"):
        relay.put("a")
        assert relay.flush(timeout_s=10)
    assert "settling the dispatched batches failed" in caplog.text
    relay.put("b")
    assert relay.flush(timeout_s=10)
    assert settles.seen == [1, 2]
