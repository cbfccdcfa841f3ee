"""``tasklab bench cache``: what the two-level cache buys, measured in one run.

Zipf(s) reads over ``keys`` keys with an ``l1_entries`` L1 and a loader that sleeps
``loader_cost_s`` (a database query stand-in). After ``warmup_reads`` unmeasured reads, the same
read sequence runs against the tiered cache and against a Redis-only cache; a no-cache baseline
calls the loader every time. Reported: hit rate per level, P50/P99 latency of an L1 hit, an L2
hit and a miss, throughput of each set-up, and each target of issue 5 with pass/fail.
Single-threaded: latencies are per call, not under contention. A benchmark, not a test: nothing
here asserts on time.

Two bare Redis GET figures are reported, because the round trip itself depends on how busy the
machine is kept: ``redis_get`` is a tight loop of GETs over the same keys and payloads (Redis and
the CPU stay hot, the best case), ``l2_round_trip`` is the GET inside each L2 hit, timed in place
(sparse requests between L1 hits and loader sleeps, the cache's real conditions). The L2 target
is judged on the paired figure (same request, same moment); the ratio to the tight loop is
reported next to it.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import redis

from tasklab.cache import Mode, TieredCache
from tasklab.cache.serialization import Codec, OrjsonSerializer
from tasklab.embedded import EmbeddedRedis
from tasklab.lab.stats import percentiles
from tasklab.settings import Settings, mask_url

TARGET_HIT_RATE = 0.95
TARGET_L1_P99_US = 10.0
TARGET_L2_VS_GET = 1.5


def zipf_sequence(keys: int, s: float, n: int, *, seed: int) -> list[int]:
    """``n`` key indices in [0, keys), index i drawn with probability ∝ 1/(i+1)^s."""
    cumulative = list(itertools.accumulate(1.0 / (rank**s) for rank in range(1, keys + 1)))
    total = cumulative[-1]
    rng = random.Random(seed)
    return [min(bisect.bisect_left(cumulative, rng.random() * total), keys - 1) for _ in range(n)]


def product(i: int) -> dict[str, Any]:
    """The cached value: a small product record (~110 bytes as JSON)."""
    return {
        "id": i,
        "name": f"product {i}",
        "price_cents": 1000 + i,
        "stock": i % 50,
        "tags": ["bench", "zipf"],
    }


def make_loader(cost_s: float) -> Callable[[int], dict[str, Any]]:
    def load(i: int) -> dict[str, Any]:
        if cost_s > 0:
            time.sleep(cost_s)
        return product(i)

    return load


def run_cache_bench(
    settings: Settings,
    *,
    keys: int = 10_000,
    l1_entries: int = 1_000,
    reads: int = 100_000,
    warmup_reads: int | None = None,
    zipf_s: float = 1.1,
    loader_cost_s: float = 0.002,
    redis_url: str | None = None,
    baseline_reads: int = 500,
    redis_get_samples: int = 5_000,
    seed: int = 1,
) -> dict[str, Any]:
    """Run the benchmark; return a JSON-able dict (see the module docstring).

    ``redis_url`` (else ``settings.redis_url``, else an embedded Redis started for the run)
    must be a Redis nobody else is loading heavily. Each run uses fresh cache names and
    deletes its keys at the end.
    """
    warmup = reads if warmup_reads is None else warmup_reads
    load_before = os.getloadavg()[0]
    warm_seq = zipf_sequence(keys, zipf_s, warmup, seed=seed)
    measured_seq = zipf_sequence(keys, zipf_s, reads, seed=seed + 1)
    loader = make_loader(loader_cost_s)
    with _redis(settings, redis_url) as url:
        run_settings = settings.model_copy(update={"redis_url": url})
        redis_get = _bare_get_us(url, measured_seq[:redis_get_samples])
        tiered = _run_cache(run_settings, "tiered", l1_entries, loader, warm_seq, measured_seq)
        redis_only = _run_cache(run_settings, "l2", l1_entries, loader, warm_seq, measured_seq)
    no_cache = _no_cache_throughput(loader, measured_seq[:baseline_reads])
    config = {
        "keys": keys,
        "l1_entries": l1_entries,
        "reads": reads,
        "warmup_reads": warmup,
        "zipf_s": zipf_s,
        "loader_cost_s": loader_cost_s,
        "seed": seed,
        "redis": mask_url(url),
        "cpus": os.cpu_count(),
        # Other work on the machine shows in the tails; record how busy it was.
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
    }
    return _report(config, tiered, redis_only, no_cache, redis_get)


@contextmanager
def _redis(settings: Settings, redis_url: str | None) -> Iterator[str]:
    url = redis_url or settings.redis_url
    if url:
        yield url
        return
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedRedis(settings.home_dir / "bench-cache-redis"))
        yield server.url


def _bare_get_us(url: str, seq: list[int]) -> list[float]:
    """GET round trips in a tight loop, same keys (Zipf order) and payload sizes, in µs."""
    client = redis.Redis.from_url(url)
    prefix = f"tasklab:bench:get:{uuid.uuid4().hex[:8]}:"
    codec = Codec(OrjsonSerializer())
    names = [prefix + str(i) for i in sorted(set(seq))]
    try:
        pipe = client.pipeline(transaction=False)
        for name, i in zip(names, sorted(set(seq)), strict=True):
            pipe.set(
                name,
                codec.encode(product(i), written_at=time.time(), ttl_s=600, l1_ttl_s=600),
                ex=600,
            )
        pipe.execute()
        for i in seq[:200]:  # connect and warm up
            client.get(prefix + str(i))
        out = []
        for i in seq:
            name = prefix + str(i)
            start = time.perf_counter_ns()
            client.get(name)
            out.append((time.perf_counter_ns() - start) / 1000)
        return out
    finally:
        for at in range(0, len(names), 1000):
            client.delete(*names[at : at + 1000])
        client.close()


def _run_cache(
    settings: Settings,
    mode: Mode,
    l1_entries: int,
    loader: Callable[[int], dict[str, Any]],
    warm_seq: list[int],
    measured_seq: list[int],
) -> dict[str, Any]:
    cache = TieredCache(
        settings,
        name=f"bench-{mode}-{uuid.uuid4().hex[:8]}",
        mode=mode,
        l1_max_entries=l1_entries,
        ttl_s=3600,
    )
    try:
        if mode == "tiered":
            cache.wait_coherent(10)
        for i in warm_seq:
            cache.get_or_set(f"p:{i}", partial(loader, i))
        return _measure(cache, loader, measured_seq)
    finally:
        cache.clear()
        cache.close()


def _measure(
    cache: TieredCache, loader: Callable[[int], dict[str, Any]], seq: list[int]
) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {"l1": [], "l2": [], "miss": []}
    round_trips: list[float] = []  # the Redis GET inside each L2 hit
    c = cache.counters
    get_us = _time_l2_gets(cache)
    started = time.perf_counter()
    for i in seq:
        key, load = f"p:{i}", partial(loader, i)
        l1_before, l2_before = c.l1_hits, c.l2_hits
        get_us.clear()
        t0 = time.perf_counter_ns()
        cache.get_or_set(key, load)
        elapsed_us = (time.perf_counter_ns() - t0) / 1000
        level = "l1" if c.l1_hits != l1_before else "l2" if c.l2_hits != l2_before else "miss"
        latencies[level].append(elapsed_us)
        if level == "l2":
            round_trips.extend(get_us)
    elapsed_s = time.perf_counter() - started
    n = len(seq)
    return {
        "latencies_us": latencies,
        "round_trips_us": round_trips,
        "throughput_per_s": n / elapsed_s,
        "hit_rate": {level: len(values) / n for level, values in latencies.items()},
    }


def _time_l2_gets(cache: TieredCache) -> list[float]:
    """Time every Redis GET the cache makes from now on (its own client, timed in place)."""
    times: list[float] = []
    l2 = cache.l2
    if l2 is None:
        return times
    inner = l2.get

    def timed_get(key: str) -> bytes | None:
        start = time.perf_counter_ns()
        try:
            return inner(key)
        finally:
            times.append((time.perf_counter_ns() - start) / 1000)

    l2.get = timed_get  # type: ignore[method-assign]
    return times


def _no_cache_throughput(loader: Callable[[int], dict[str, Any]], seq: list[int]) -> float:
    started = time.perf_counter()
    for i in seq:
        loader(i)
    elapsed_s = time.perf_counter() - started
    return len(seq) / elapsed_s if elapsed_s > 0 else 0.0


def _report(
    config: dict[str, Any],
    tiered: dict[str, Any],
    redis_only: dict[str, Any],
    no_cache_per_s: float,
    redis_get_us: list[float],
) -> dict[str, Any]:
    lat = tiered["latencies_us"]
    latency_us = {
        **percentiles(lat["l1"], "l1_hit"),
        **percentiles(lat["l2"], "l2_hit"),
        **percentiles(lat["miss"], "miss"),
        **percentiles(tiered["round_trips_us"], "l2_round_trip"),
        **percentiles(redis_get_us, "redis_get"),
        **percentiles(redis_only["latencies_us"]["l2"], "redis_only_hit"),
    }
    rates = tiered["hit_rate"]
    overall = rates["l1"] + rates["l2"]
    throughput = {
        "tiered": tiered["throughput_per_s"],
        "redis_only": redis_only["throughput_per_s"],
        "no_cache": no_cache_per_s,
    }
    l2_vs_get = _ratio(latency_us["l2_hit_p50"], latency_us["l2_round_trip_p50"])
    targets = {
        "overall_hit_rate": _target(overall, TARGET_HIT_RATE, overall > TARGET_HIT_RATE, ">"),
        "l1_hit_p99_us": _target(
            latency_us["l1_hit_p99"],
            TARGET_L1_P99_US,
            0 < latency_us["l1_hit_p99"] < TARGET_L1_P99_US,
            "<",
        ),
        "l2_hit_p50_vs_its_redis_get_p50": _target(
            l2_vs_get, TARGET_L2_VS_GET, 0 < l2_vs_get <= TARGET_L2_VS_GET, "<="
        ),
    }
    reference = {
        "l2_hit_p50_vs_tight_loop_get_p50": _ratio(
            latency_us["l2_hit_p50"], latency_us["redis_get_p50"]
        ),
        "redis_only_hit_p50_vs_tight_loop_get_p50": _ratio(
            latency_us["redis_only_hit_p50"], latency_us["redis_get_p50"]
        ),
    }
    return {
        "config": config,
        "hit_rate": {
            "l1": rates["l1"],
            "l2": rates["l2"],
            "overall": overall,
            "miss": rates["miss"],
            "redis_only": redis_only["hit_rate"]["l2"],
        },
        "samples": {level: len(values) for level, values in lat.items()},
        "latency_us": latency_us,
        "throughput_per_s": throughput,
        "speedup": {
            "vs_no_cache": throughput["tiered"] / no_cache_per_s if no_cache_per_s else 0.0,
            "vs_redis_only": throughput["tiered"] / throughput["redis_only"],
        },
        "targets": targets,
        "reference_ratios": reference,
        "passed": all(t["pass"] for t in targets.values()),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _target(measured: float, target: float, passed: bool, op: str) -> dict[str, Any]:
    return {"measured": measured, "target": f"{op} {target}", "pass": passed}


__all__ = ["run_cache_bench", "zipf_sequence"]
