"""Single-flight: concurrent callers asking for the same key share one loader call.

The first caller for a key (the leader) runs the function; callers arriving while it runs wait
and receive its result or its exception. ``do_if_idle`` runs the function only if no call for
the key is in flight, and never waits (early refresh uses it: everyone else keeps serving the
old value).

``SingleFlight`` is for threads, ``AsyncSingleFlight`` for tasks on an event loop. They are
separate: a thread and a coroutine asking for the same key each lead their own flight.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")


class _Call:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def result(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class SingleFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, _Call] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def do(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = self._calls[key] = _Call()
        if not leader:
            return cast(T, call.result())
        return self._lead(key, call, fn)

    def do_if_idle(self, key: str, fn: Callable[[], T]) -> tuple[bool, T | None]:
        """``(True, fn())`` if no call for ``key`` was in flight, else ``(False, None)``."""
        with self._lock:
            if key in self._calls:
                return False, None
            call = self._calls[key] = _Call()
        return True, self._lead(key, call, fn)

    def _lead(self, key: str, call: _Call, fn: Callable[[], T]) -> T:
        try:
            call.value = fn()
            return cast(T, call.value)
        except BaseException as e:
            call.error = e
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()


class AsyncSingleFlight:
    """Flights are per event loop: a future cannot be awaited from another loop."""

    def __init__(self) -> None:
        self._futures: dict[tuple[int, str], asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        slot = (id(loop), key)
        while (future := self._futures.get(slot)) is not None:
            try:
                return cast(T, await asyncio.shield(future))
            except asyncio.CancelledError:
                if future.cancelled() and not _being_cancelled():
                    continue  # the leader was cancelled, not us: lead a new flight
                raise
        return await self._lead(slot, loop.create_future(), fn)

    async def do_if_idle(self, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        loop = asyncio.get_running_loop()
        slot = (id(loop), key)
        if slot in self._futures:
            return False, None
        return True, await self._lead(slot, loop.create_future(), fn)

    async def _lead(
        self, slot: tuple[int, str], future: asyncio.Future[Any], fn: Callable[[], Awaitable[T]]
    ) -> T:
        self._futures[slot] = future
        try:
            value = await fn()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: no "never retrieved" log if nobody waited
            raise
        else:
            future.set_result(value)
            return value
        finally:
            if self._futures.get(slot) is future:
                del self._futures[slot]


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


__all__ = ["AsyncSingleFlight", "SingleFlight"]
