"""Summary statistics for latency samples."""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values (0 for no values)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def percentiles(values: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix_p50, prefix_p95, prefix_p99, prefix_max}`` of ``values``."""
    ordered = sorted(values)
    out = {f"{prefix}_p{int(q * 100)}": quantile(ordered, q) for q in (0.5, 0.95, 0.99)}
    out[f"{prefix}_max"] = float(ordered[-1]) if ordered else 0.0
    return out
