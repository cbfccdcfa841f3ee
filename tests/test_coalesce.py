"""Coalescer: calls that meet while a batch runs go together as the next batch."""

from __future__ import annotations

import asyncio

import pytest

from tasklab.coalesce import Coalescer


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()

    async def run(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        await self.gate.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_the_first_call_runs_alone_and_the_ones_meanwhile_run_as_one_batch() -> None:
    rec = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(rec.run)
    first = asyncio.create_task(coalescer.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(coalescer.submit(i)) for i in (2, 4, 6)]
    await asyncio.sleep(0)
    rec.gate.set()
    assert await first == 0
    assert [await t for t in rest] == [20, 40, 60]
    assert rec.batches == [[0], [2, 4, 6]]


async def test_each_caller_gets_its_own_outcome() -> None:
    rec = Recorder()
    rec.gate.set()
    coalescer: Coalescer[int, int] = Coalescer(rec.run)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(4)), return_exceptions=True)
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], ValueError) and "odd 1" in str(results[1])
    assert isinstance(results[3], ValueError) and "odd 3" in str(results[3])


async def test_a_batch_that_raises_fails_every_caller_in_it() -> None:
    async def broken(items: list[int]) -> list[int | BaseException]:
        raise ConnectionError("database gone")

    coalescer: Coalescer[int, int] = Coalescer(broken)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_cancelled_caller_does_not_abandon_the_others_in_its_batch() -> None:
    rec = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(rec.run, max_batch=8)
    first = asyncio.create_task(coalescer.submit(0))
    await asyncio.sleep(0)
    first.cancel()  # the call that started the batch goes away
    other = asyncio.create_task(coalescer.submit(2))
    await asyncio.sleep(0)
    rec.gate.set()
    assert await other == 20
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_max_batch_bounds_a_batch() -> None:
    rec = Recorder()
    rec.gate.set()
    coalescer: Coalescer[int, int] = Coalescer(rec.run, max_batch=2)
    await asyncio.gather(*(coalescer.submit(i) for i in (0, 2, 4, 6, 8)))
    assert max(len(b) for b in rec.batches) == 2
    assert sorted(i for b in rec.batches for i in b) == [0, 2, 4, 6, 8]
