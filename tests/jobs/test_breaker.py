"""The publishing circuit breaker: no caller waits for a probe, an interrupted probe lets
the next one through, and a real broker coming back closes the circuit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tasklab.embedded import EmbeddedRedis, free_port
from tasklab.errors import BrokerUnavailable
from tasklab.jobs.breaker import CircuitBreaker, State
from tasklab.jobs.publisher import Publisher
from tasklab.settings import Settings


def test_no_caller_waits_for_the_half_open_probe() -> None:
    probing = threading.Event()

    def slow_broker() -> None:  # a frozen broker: answers nothing for a while
        probing.set()
        time.sleep(0.5)
        raise ConnectionError("no answer")

    breaker = CircuitBreaker(0.05, probe=slow_broker)
    breaker.record_failure("test")
    time.sleep(0.1)

    started = time.monotonic()
    answers = [breaker.allow() for _ in range(50)]
    assert probing.wait(2)
    answers += [breaker.allow() for _ in range(50)]

    assert time.monotonic() - started < 0.2
    assert not any(answers)
    time.sleep(0.6)
    assert breaker.state is State.OPEN  # the probe failed: open again, not probing for ever


def test_a_probe_interrupted_by_a_base_exception_lets_the_next_one_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    publisher = Publisher(
        Settings(home_dir=tmp_path, redis_url=url, breaker_reset_s=0.05, publish_timeout_s=0.2)
    )
    publisher.breaker.probe = None  # the caller's own publish is the probe
    publisher.breaker.record_failure("test")
    time.sleep(0.1)

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(publisher.app, "send_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publisher.publish("t", "j", queue="default", priority=5)

    assert publisher.breaker.allow(), "the breaker stayed probing after the interruption"
    publisher.close()


def test_the_circuit_closes_when_the_broker_answers_again(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    settings = Settings(
        home_dir=tmp_path, redis_url=server.url, breaker_reset_s=0.05, publish_timeout_s=0.3
    )
    publisher = Publisher(settings)
    with pytest.raises(BrokerUnavailable):
        publisher.publish("t", "j", queue="default", priority=5)  # not started yet
    assert publisher.breaker.is_open
    server.start()
    try:
        deadline = time.monotonic() + 10
        while publisher.breaker.is_open and time.monotonic() < deadline:
            publisher.breaker.allow()  # starts a probe in the background when due
            time.sleep(0.05)
        assert not publisher.breaker.is_open
        assert publisher.publish("t", "j", queue="default", priority=5)
    finally:
        publisher.close()
        server.stop()
