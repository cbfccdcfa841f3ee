"""``@profiled(threshold_s=1.0)``: time a function (sync or async) and log the slow calls.

Every call lands in ``tasklab_profiled_duration_seconds{function="module.qualname"}``; calls
slower than ``threshold_s`` are logged at WARNING. The label is the function's dotted name, a
bounded set fixed by the code. Generators are timed until they return the generator object
only: decorate the function that consumes them instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, ParamSpec, TypeVar, cast

from tasklab.observe.metrics import PROFILED_DURATION

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)


def profiled(
    threshold_s: float = 1.0, *, name: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator factory; ``name`` overrides the ``function`` label."""
    if threshold_s < 0:
        raise ValueError("threshold_s must be >= 0")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        label = name or f"{fn.__module__}.{fn.__qualname__}"

        def finish(started: float) -> None:
            elapsed_s = perf_counter() - started
            PROFILED_DURATION.labels(label).observe(elapsed_s)
            if elapsed_s > threshold_s:
                log.warning(
                    "slow call: %s took %.3f s (threshold %.3f s)",
                    label,
                    elapsed_s,
                    threshold_s,
                    extra={"function": label, "duration_s": elapsed_s},
                )

        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                started = perf_counter()
                try:
                    return await async_fn(*args, **kwargs)
                finally:
                    finish(started)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                finish(started)

        return wrapper

    return decorate
