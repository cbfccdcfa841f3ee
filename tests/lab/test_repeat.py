"""Repeated trials: every round in its own shuffled order, each figure folded into its
median and spread."""

from __future__ import annotations

import random

from tasklab.lab.repeat import run_repeated
from tasklab.lab.results import LabResult, Series


def test_each_unit_runs_every_round_in_a_shuffled_order_and_figures_become_medians() -> None:
    result = LabResult("stress")
    calls: list[str] = []
    trials = {"a": iter([5.0, 1.0, 3.0]), "b": iter([10.0, 30.0, 20.0])}

    def unit(name: str) -> None:
        calls.append(name)
        result.figures[f"{name}.rate_per_s"] = next(trials[name])
        result.figures[f"{name}.latency_ms_max"] = 1.0
        result.series.append(Series("chart", name, "line", "s", "n", [(0.0, 1.0)]))

    run_repeated(
        result, [("a", lambda: unit("a")), ("b", lambda: unit("b"))], repeat=3, rng=random.Random(3)
    )
    rounds = [sorted(calls[i : i + 2]) for i in (0, 2, 4)]
    assert rounds == [["a", "b"]] * 3
    assert len({tuple(calls[i : i + 2]) for i in (0, 2, 4)}) > 1  # the order moved
    f = result.figures
    assert (f["a.rate_per_s_min"], f["a.rate_per_s"], f["a.rate_per_s_max"]) == (1.0, 3.0, 5.0)
    assert (f["b.rate_per_s_min"], f["b.rate_per_s"], f["b.rate_per_s_max"]) == (10.0, 20.0, 30.0)
    assert "a.latency_ms_max_max" not in f
    assert len(result.series) == 2  # the first round's charts only
    assert result.params["repeat"] == 3


def test_a_single_trial_keeps_its_figures_as_they_are() -> None:
    result = LabResult("bench")
    run_repeated(
        result,
        [("x", lambda: result.figures.__setitem__("x.n_per_s", 7.0))],
        repeat=1,
        rng=random.Random(0),
    )
    assert result.figures == {"x.n_per_s": 7.0}
