from __future__ import annotations

import asyncio
import threading

import pytest

from tasklab.cache.singleflight import AsyncSingleFlight, SingleFlight
from tests.cache.support import wait_until


def test_concurrent_callers_share_one_call_and_its_result() -> None:
    flight = SingleFlight()
    release = threading.Event()
    calls: list[int] = []
    results: list[int] = []

    def fn() -> int:
        calls.append(1)
        release.wait(5)
        return 42

    threads = [
        threading.Thread(target=lambda: results.append(flight.do("k", fn))) for _ in range(20)
    ]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(calls) == 1)
    release.set()
    for t in threads:
        t.join()
    assert calls == [1] and results == [42] * 20 and len(flight) == 0


def test_followers_receive_the_leaders_exception() -> None:
    flight = SingleFlight()
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def fn() -> int:
        started.set()
        release.wait(5)
        raise ValueError("boom")

    def call() -> None:
        try:
            flight.do("k", fn)
        except ValueError as e:
            errors.append(e)

    leader = threading.Thread(target=call)
    leader.start()
    started.wait(5)
    follower = threading.Thread(target=call)
    follower.start()
    assert wait_until(lambda: follower.is_alive())
    release.set()
    leader.join()
    follower.join()
    assert len(errors) == 2 and errors[0] is errors[1]


def test_do_if_idle_does_not_wait_for_a_flight_in_progress() -> None:
    flight = SingleFlight()
    inside = threading.Event()
    release = threading.Event()

    def slow() -> str:
        inside.set()
        release.wait(5)
        return "slow"

    t = threading.Thread(target=flight.do, args=("k", slow))
    t.start()
    inside.wait(5)
    assert flight.do_if_idle("k", lambda: "other") == (False, None)
    release.set()
    t.join()
    assert flight.do_if_idle("k", lambda: "idle") == (True, "idle")


async def test_concurrent_tasks_share_one_call() -> None:
    flight = AsyncSingleFlight()
    calls: list[int] = []

    async def fn() -> str:
        calls.append(1)
        await asyncio.sleep(0.01)
        return "v"

    results = await asyncio.gather(*[flight.do("k", fn) for _ in range(100)])
    assert calls == [1] and set(results) == {"v"} and len(flight) == 0


async def test_a_cancelled_leader_hands_the_flight_to_a_waiting_task() -> None:
    flight = AsyncSingleFlight()
    calls: list[str] = []
    started = asyncio.Event()

    async def fn() -> str:
        calls.append("call")
        started.set()
        await asyncio.sleep(0.05)
        return "v"

    leader = asyncio.create_task(flight.do("k", fn))
    await started.wait()
    follower = asyncio.create_task(flight.do("k", fn))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await follower == "v"
    assert calls == ["call", "call"]
