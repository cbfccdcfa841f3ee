"""An open-loop load generator: requests sent on a fixed arrival schedule, not by users that
wait for each answer.

Request ``i`` of a run at ``rate`` per second is due at ``t0 + i / rate``; it is sent then
whether or not the earlier ones were answered, and its latency is measured from that due
time, so a service (or a generator) that falls behind shows in the latency instead of
lowering the request rate (no coordinated omission). How late the generator itself started
each request is kept apart (``lag``), as is its own CPU time.

While the requests run, the orders still pending in the service's database are counted
every ``BACKLOG_POLL_S``: the slope of that count is how fast the work behind the requests
falls behind (0 when the workers keep up).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from tasklab.lab.shop import Account
from tasklab.lab.stats import percentiles

BACKLOG_POLL_S = 0.5
ENDPOINTS = ("orders", "points")


@dataclass(frozen=True)
class Schedule:
    """``rate_per_s`` requests a second for ``warmup_s`` (sent, not counted: connections are
    opened, caches filled) and then ``duration_s`` (counted)."""

    rate_per_s: float
    duration_s: float
    warmup_s: float = 1.0
    timeout_s: float = 5.0
    max_connections: int = 256
    endpoint: str = "orders"

    def due_times(self) -> list[float]:
        """Seconds after the start at which each request is due."""
        n = round((self.warmup_s + self.duration_s) * self.rate_per_s)
        return [i / self.rate_per_s for i in range(n)]


@dataclass
class Outcome:
    """What one run of a schedule saw (counted requests only)."""

    schedule: Schedule
    latencies_ms: list[float] = field(default_factory=list)  # from the due time, answered 2xx
    lags_ms: list[float] = field(default_factory=list)  # the generator's own lateness
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count
    job_ids: list[str] = field(default_factory=list)  # the accepted orders' settlement jobs
    backlog: list[tuple[float, float]] = field(default_factory=list)  # (s, pending orders)
    window_s: float = 0.0  # first counted due time to the last answer
    generator_cpu_s: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    def backlog_growth_per_s(self) -> float | None:
        """Least-squares slope of the pending orders over the counted window (None: fewer
        than three samples, or no database to count them in)."""
        points = [(t, n) for t, n in self.backlog if t >= self.schedule.warmup_s]
        return slope(points) if len(points) >= 3 else None

    def figures(self) -> dict[str, float]:
        sent = self.sent
        failed = sum(self.errors.values())
        out = {
            "offered_per_s": self.schedule.rate_per_s,
            "requests": float(sent),
            "answered_per_s": len(self.latencies_ms) / self.window_s if self.window_s else 0.0,
            "errors": float(failed),
            "error_pct": 100.0 * failed / sent if sent else 0.0,
            "generator_cpu_pct": 100.0 * self.generator_cpu_s / self.window_s
            if self.window_s
            else 0.0,
            **percentiles(self.latencies_ms, "latency_ms"),
            **percentiles(self.lags_ms, "generator_lag_ms"),
        }
        growth = self.backlog_growth_per_s()
        if growth is not None:
            out["backlog_growth_per_s"] = growth
            out["settled_per_s"] = max(0.0, self.schedule.rate_per_s - growth)
        return out


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / var


class OpenLoop:
    """Sends a schedule's requests to the reference service as its seeded users."""

    def __init__(
        self,
        url: str,
        accounts: Sequence[Account],
        products: Sequence[int],
        *,
        pending: Callable[[], int] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.accounts = list(accounts)
        self.products = list(products) or [1]
        self.pending = pending  # counts the service's pending orders (None: not judged)

    def run(self, schedule: Schedule) -> Outcome:
        """Run ``schedule`` to its end (every request answered or timed out)."""
        me = psutil.Process()
        cpu_before = _cpu_s(me)
        outcome = asyncio.run(self._run(schedule))
        outcome.generator_cpu_s = _cpu_s(me) - cpu_before
        return outcome

    async def _run(self, schedule: Schedule) -> Outcome:
        outcome = Outcome(schedule)
        limits = httpx.Limits(
            max_connections=schedule.max_connections,
            max_keepalive_connections=schedule.max_connections,
        )
        # The pool wait counts against the request's timeout: a request that cannot get a
        # connection in time is an error, not a silently late send.
        timeout = httpx.Timeout(schedule.timeout_s, pool=schedule.timeout_s)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout) as http:
            t0 = time.perf_counter()
            done = asyncio.Event()
            sampler = asyncio.create_task(self._sample_backlog(outcome, t0, done))
            tasks = []
            for i, due in enumerate(schedule.due_times()):
                wait = t0 + due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                tasks.append(asyncio.create_task(self._send(http, outcome, i, t0, due)))
            await asyncio.gather(*tasks)
            outcome.window_s = max(1e-9, time.perf_counter() - t0 - schedule.warmup_s)
            done.set()
            await sampler
        return outcome

    async def _send(
        self, http: httpx.AsyncClient, outcome: Outcome, i: int, t0: float, due_s: float
    ) -> None:
        due = t0 + due_s
        lag_ms = (time.perf_counter() - due) * 1000
        try:
            reply = await self._request(http, outcome.schedule.endpoint, i)
            error = None if reply.status_code < 300 else f"HTTP {reply.status_code}"
        except httpx.HTTPError as e:
            reply, error = None, type(e).__name__
        latency_ms = (time.perf_counter() - due) * 1000
        if due_s < outcome.schedule.warmup_s:
            return
        outcome.lags_ms.append(lag_ms)
        if error is not None:
            outcome.errors[error] = outcome.errors.get(error, 0) + 1
            return
        outcome.latencies_ms.append(latency_ms)
        if reply is not None and outcome.schedule.endpoint == "orders":
            job_id = reply.json().get("job_id")
            if job_id:
                outcome.job_ids.append(str(job_id))

    async def _request(self, http: httpx.AsyncClient, endpoint: str, i: int) -> httpx.Response:
        account = self.accounts[i % len(self.accounts)]
        if endpoint == "points":
            return await http.get("/api/v1/points", headers=account.headers)
        product = self.products[i % len(self.products)]
        body: dict[str, Any] = {"items": [{"product_id": product, "quantity": 1}], "use_points": 1}
        headers = {**account.headers, "Idempotency-Key": uuid.uuid4().hex}
        return await http.post("/api/v1/orders", json=body, headers=headers)

    async def _sample_backlog(self, outcome: Outcome, t0: float, done: asyncio.Event) -> None:
        if self.pending is None or outcome.schedule.endpoint != "orders":
            return
        while not done.is_set():
            count = await asyncio.to_thread(self.pending)
            outcome.backlog.append((time.perf_counter() - t0, float(count)))
            try:
                await asyncio.wait_for(done.wait(), BACKLOG_POLL_S)
            except TimeoutError:
                continue


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)
