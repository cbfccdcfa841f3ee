from __future__ import annotations

from tasklab.cache import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.opened = 0
        self.recovered: list[bool] = []

    def breaker(self, clock: Clock, threshold: int = 3) -> CircuitBreaker:
        return CircuitBreaker(
            failure_threshold=threshold,
            reset_s=5.0,
            clock=clock,
            on_open=self.on_open,
            on_recover=self.recovered.append,
        )

    def on_open(self) -> None:
        self.opened += 1


def test_the_circuit_opens_after_consecutive_failures_and_then_refuses_calls() -> None:
    rec, clock = Recorder(), Clock()
    breaker = rec.breaker(clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and rec.opened == 1
    assert not breaker.allow() and not breaker.available


def test_a_success_between_failures_resets_the_count() -> None:
    rec, clock = Recorder(), Clock()
    breaker = rec.breaker(clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert rec.recovered == [False]  # a success after failures, without an outage


def test_after_reset_s_one_probe_goes_through_and_its_success_closes_the_circuit() -> None:
    rec, clock = Recorder(), Clock()
    breaker = rec.breaker(clock, threshold=1)
    breaker.record_failure()
    clock.now = 4.9
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.available
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # everyone else waits for its answer
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert rec.recovered == [True]


def test_a_failed_probe_reopens_the_circuit_without_a_second_open_hook() -> None:
    rec, clock = Recorder(), Clock()
    breaker = rec.breaker(clock, threshold=1)
    breaker.record_failure()
    clock.now = 5.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    assert rec.opened == 1  # one outage, one transition
    clock.now = 10.0
    assert breaker.allow()
