"""Coalescing concurrent calls into batches (group commit) inside one event loop.

The first call runs at once, alone; calls that arrive while a batch is in flight wait for it
and then go together as the next batch. An idle system pays no added delay, and a busy one
makes one round trip (one SQLite write lock, one WAL flush, one thread hop) per batch
instead of per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_batch: int = 64,
    ) -> None:
        """``run_batch(items)`` returns one outcome per item, in order: a result, or the
        exception to raise for that item alone. If it raises, every item of the batch
        raises it."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._drainer is None:
            # A task of its own: a caller that is cancelled must not abandon the batch that
            # carries the others' items.
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    outcomes = await self._run_batch([item for item, _ in batch])
                except BaseException as e:
                    outcomes = [e] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._drainer = None
            for _, future in self._waiting:  # only if the loop is shutting down mid-batch
                if not future.done():
                    future.cancel()
            self._waiting.clear()
