"""Repeated trials: each unit of a run (a scenario, a dimension) measured ``repeat`` times,
every round in a freshly shuffled order, so that a slow moment of the machine does not fall
on one candidate only. Each figure becomes the median of its trials, with ``<figure>_min``
and ``<figure>_max`` beside it (the spread the report draws and ``--compare`` honours).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence

from tasklab.lab.results import LabResult

Unit = tuple[str, Callable[[], None]]  # (figure prefix, what measures it)


def run_repeated(
    result: LabResult, units: Sequence[Unit], *, repeat: int, rng: random.Random
) -> None:
    """Run every unit ``repeat`` times, interleaved; fold their figures into median and
    spread. Charts and tables are the first round's (tables: the last's)."""
    values: dict[str, list[float]] = {}
    for round_no in range(max(1, repeat)):
        order = list(units)
        rng.shuffle(order)
        for prefix, measure in order:
            kept = len(result.series)
            measure()
            for name, value in result.figures.items():
                if name.startswith(f"{prefix}."):
                    values.setdefault(name, []).append(value)
            if round_no:
                del result.series[kept:]
    if repeat > 1:
        fold(result.figures, values)
        result.params["repeat"] = repeat
        result.params["order"] = "shuffled per round"


def fold(figures: dict[str, float], values: dict[str, list[float]]) -> None:
    """Each figure measured more than once: its median, with ``_min`` and ``_max``."""
    for name, trials in values.items():
        if len(trials) < 2:
            continue
        figures[name] = float(statistics.median(trials))
        if not name.endswith(("_min", "_max")):  # a maximum's own spread would read as noise
            figures[f"{name}_min"] = min(trials)
            figures[f"{name}_max"] = max(trials)
