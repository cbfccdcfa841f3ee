"""From samples to figures: throughput, latency percentiles, outcomes, CDFs, rates, slopes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tasklab.lab.results import Series
from tasklab.lab.stats import percentiles
from tasklab.lab.workload import Sample, Ticket

CDF_POINTS = 200


def throughput_per_s(samples: Sequence[Sample]) -> float:
    """Succeeded tasks per second, from the first submit to the last finish (end to end)."""
    done = [s for s in samples if s.ok and s.finished_at is not None]
    if not done:
        return 0.0
    first = min(s.sent_at for s in samples)
    span_s = max(s.finished_at or 0.0 for s in done) - first
    return len(done) / span_s if span_s > 0 else 0.0


def execution_rate_per_s(samples: Sequence[Sample]) -> float:
    """Succeeded tasks per second from the first start to the last finish (worker side)."""
    done = [s for s in samples if s.ok and s.started_at and s.finished_at]
    if len(done) < 2:
        return 0.0
    span_s = max(s.finished_at or 0.0 for s in done) - min(s.started_at or 0.0 for s in done)
    return len(done) / span_s if span_s > 0 else 0.0


def outcome_figures(samples: Sequence[Sample]) -> dict[str, float]:
    counts = {status: 0 for status in ("succeeded", "failed", "dead", "cancelled", "lost")}
    for s in samples:
        counts[s.status] = counts.get(s.status, 0) + 1
    total = len(samples)
    out: dict[str, float] = {"submitted": total, **counts}
    out["success_pct"] = 100.0 * counts["succeeded"] / total if total else 0.0
    return out


def latency_figures(samples: Sequence[Sample]) -> dict[str, float]:
    done = [s for s in samples if s.ok]
    out: dict[str, float] = {}
    for name in ("queue_wait_ms", "run_ms", "e2e_ms"):
        values = [v for v in (getattr(s, name) for s in done) if v is not None]
        if values:
            out.update(percentiles(values, name))
    return out


def percentiles_of(
    samples: Sequence[Sample], field: str, *, prefix: str | None = None
) -> dict[str, float]:
    """P50/P95/P99/max of one latency field (``queue_wait_ms``, ``run_ms``, ``e2e_ms``) over
    the succeeded samples."""
    values = [v for v in (getattr(s, field) for s in samples if s.ok) if v is not None]
    return percentiles(values, prefix or field)


def submit_figures(tickets: Sequence[Ticket], *, prefix: str = "submit_ms") -> dict[str, float]:
    return percentiles([t.submit_ms for t in tickets], prefix)


def summarize(samples: Sequence[Sample], tickets: Sequence[Ticket] = ()) -> dict[str, float]:
    """Outcomes, end-to-end throughput and every latency percentile of one batch."""
    out = outcome_figures(samples)
    out["throughput_per_s"] = throughput_per_s(samples)
    out.update(latency_figures(samples))
    if tickets:
        out.update(submit_figures(tickets))
    return out


def cdf_points(values: Sequence[float], max_points: int = CDF_POINTS) -> list[tuple[float, float]]:
    """(value, fraction <= value), thinned to at most ``max_points`` (the last one kept)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return []
    step = max(1, math.ceil(n / max_points))
    idx = [*range(step - 1, n, step)]
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return [(ordered[i], (i + 1) / n) for i in idx]


def cdf_series(
    samples: Sequence[Sample], *, chart: str, label: str, field: str = "e2e_ms"
) -> Series:
    values = [v for v in (getattr(s, field) for s in samples if s.ok) if v is not None]
    return Series(
        chart, label, "cdf", field.replace("_", " "), "fraction of tasks", cdf_points(values)
    )


def completions_over_time(
    samples: Sequence[Sample], *, bucket_s: float = 0.5, t0: float | None = None
) -> list[tuple[float, float]]:
    """(seconds into the run, completions per second) per bucket."""
    finished = sorted(s.finished_at for s in samples if s.finished_at is not None)
    if not finished:
        return []
    start = t0 if t0 is not None else min(s.sent_at for s in samples)
    buckets: dict[int, int] = {}
    for t in finished:
        key = int((t - start) // bucket_s)
        buckets[key] = buckets.get(key, 0) + 1
    last = max(buckets)
    return [(round((k + 1) * bucket_s, 3), buckets.get(k, 0) / bucket_s) for k in range(last + 1)]


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept); slope 0 with fewer than two distinct x."""
    n = len(xs)
    if n < 2:
        return 0.0, (ys[0] if ys else 0.0)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def priority_inversions(samples: Sequence[Sample]) -> tuple[int, int]:
    """(starts that jumped a waiting higher-priority task, starts considered).

    A start of task *a* is an inversion when some task *b* of higher priority (9 most urgent)
    was already submitted (``b.sent_at < a.started_at``) and had not started yet
    (``b.started_at > a.started_at``)."""
    rows: list[tuple[int, float, float]] = []
    for s in samples:
        if s.started_at is not None and s.priority is not None:
            rows.append((s.priority, s.sent_at, s.started_at))
    inversions = sum(
        1
        for prio_a, _, start_a in rows
        if any(prio_b > prio_a and sent_b < start_a < start_b for prio_b, sent_b, start_b in rows)
    )
    return inversions, len(rows)
