"""@profiled: a histogram per function and a WARNING for calls over the threshold."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest
from prometheus_client import REGISTRY

from tasklab.observe.profiling import profiled


def calls(function: str) -> float:
    return (
        REGISTRY.get_sample_value("tasklab_profiled_duration_seconds_count", {"function": function})
        or 0.0
    )


def slow_call_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tasklab.observe.profiling"]


@profiled(threshold_s=0)
def always_slow(x: int) -> int:
    return x * 2


@profiled(threshold_s=60, name="reports.build")
def never_slow(x: int) -> int:
    return x + 1


@profiled(threshold_s=0)
async def async_always_slow(x: int) -> int:
    await asyncio.sleep(0)
    return x * 3


def test_a_sync_call_is_timed_and_logged_when_over_the_threshold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"{__name__}.always_slow"
    before = calls(name)
    caplog.set_level(logging.WARNING)

    assert always_slow(21) == 42

    assert calls(name) == before + 1
    [message] = slow_call_logs(caplog)
    assert message.startswith(f"slow call: {name} took ")


def test_a_call_under_the_threshold_is_timed_but_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = calls("reports.build")

    assert never_slow(1) == 2

    assert calls("reports.build") == before + 1
    assert slow_call_logs(caplog) == []


async def test_an_async_function_stays_async_and_is_timed_when_awaited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"{__name__}.async_always_slow"
    before = calls(name)
    caplog.set_level(logging.WARNING)

    pending = async_always_slow(2)
    assert calls(name) == before
    assert await pending == 6

    assert calls(name) == before + 1
    assert len(slow_call_logs(caplog)) == 1
    assert inspect.iscoroutinefunction(async_always_slow)


def test_an_exception_is_timed_and_propagates() -> None:
    @profiled(threshold_s=60, name="failing")
    def failing() -> None:
        raise KeyError("x")

    before = calls("failing")

    with pytest.raises(KeyError):
        failing()

    assert calls("failing") == before + 1


def test_the_wrapper_keeps_the_functions_name_and_doc() -> None:
    assert always_slow.__name__ == "always_slow"
    assert never_slow.__wrapped__(1) == 2  # type: ignore[attr-defined]
