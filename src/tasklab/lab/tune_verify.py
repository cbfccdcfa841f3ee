"""``tune``'s recommendation, verified: the recommended configuration and the current one
measured again, side by side, in ``repeat`` rounds (each round in a shuffled order, both
nodes booted and idle before the first), the same burst and the same steady rate as the
sweep.

The gain is taken per round (the two trials of a round ran next to each other) and reported
as its median with its spread. It counts only when the two configurations' throughputs do
not overlap across the rounds (every trial of the recommendation above every trial of the
current settings); otherwise the verdict is "no difference beyond noise", and tune
recommends nothing.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasklab.lab.harness import WorkerConfig

if TYPE_CHECKING:
    from tasklab.lab.results import LabResult
    from tasklab.lab.tune_recommend import Recommendation
    from tasklab.lab.tune_sweep import Sweep


@dataclass
class Verification:
    baseline: WorkerConfig
    candidate: WorkerConfig
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (round, config)

    def throughputs(self, config: WorkerConfig) -> list[float]:
        return [r["throughput_per_s"] for r in self.rows if r["config"] == config.label()]

    def gains_pct(self) -> list[float]:
        out = []
        for n in sorted({r["round"] for r in self.rows}):
            by = {r["config"]: r["throughput_per_s"] for r in self.rows if r["round"] == n}
            base, cand = by.get(self.baseline.label()), by.get(self.candidate.label())
            if base and cand is not None:
                out.append((cand / base - 1) * 100)
        return out

    @property
    def beyond_noise(self) -> bool:
        base, cand = self.throughputs(self.baseline), self.throughputs(self.candidate)
        return bool(base and cand) and min(cand) > max(base)

    def figures(self) -> dict[str, float]:
        gains = self.gains_pct()
        if not gains:
            return {"verify_rounds": 0.0}
        return {
            "verify_rounds": float(len(gains)),
            "verified_gain_pct": float(statistics.median(gains)),
            "verified_gain_pct_min": min(gains),
            "verified_gain_pct_max": max(gains),
            "verified_beyond_noise": float(self.beyond_noise),
        }

    def verdict(self) -> str:
        gains = self.gains_pct()
        if not gains:
            return "the recommendation could not be verified (no round completed)"
        mid = statistics.median(gains)
        spread = f"median {mid:+.1f} % (min {min(gains):+.1f}, max {max(gains):+.1f})"
        if self.beyond_noise:
            return (
                f"verified: {self.candidate.label()} against the current {self.baseline.label()} "
                f"over {len(gains)} interleaved rounds: {spread}"
            )
        return (
            f"no difference beyond noise: {self.candidate.label()} against the current "
            f"{self.baseline.label()} over {len(gains)} interleaved rounds: {spread}; their "
            "throughputs overlap, so nothing is recommended"
        )


def verify(
    sweep: Sweep,
    baseline: WorkerConfig,
    candidate: WorkerConfig,
    *,
    repeat: int,
    rng: random.Random,
) -> Verification:
    """Measure both configurations ``repeat`` times, interleaved, on their own queues."""
    from tasklab.lab.tune_sweep import Trial

    stack = sweep.stack
    found = Verification(baseline, candidate)
    configs = {"baseline": baseline, "candidate": candidate}
    queues = {k: f"lab-tune-{stack.run_id}-verify-{k}" for k in configs}
    nodes = [sweep.spawn(configs[k], queues[k]) for k in configs]
    try:
        stack.wait_ready(nodes)
        stack.wait_idle(nodes)
        for round_no in range(1, repeat + 1):
            order = list(configs)
            rng.shuffle(order)
            for key in order:
                trial = Trial(configs[key])
                sweep._measure(trial, queues[key])
                found.rows.append(
                    {
                        "round": round_no,
                        "config": trial.label,
                        "role": key,
                        "throughput_per_s": trial.throughput_per_s,
                        "queue_wait_ms_p95": trial.latency_ms_p95,
                    }
                )
    finally:
        stack.stop_nodes(nodes)
    return found


def verified(
    sweep: Sweep,
    rec: Recommendation,
    baseline: WorkerConfig,
    *,
    repeat: int,
    result: LabResult,
    rng: random.Random,
) -> Recommendation:
    """``rec`` once re-measured against the current settings (``repeat`` 0: as it is)."""
    from tasklab.lab.tune_recommend import Recommendation

    if rec.config is None or repeat < 1:
        return rec
    if rec.config == baseline:
        result.notes.append("the current settings measured best: nothing to change")
        return Recommendation(None, rec.meets_slo, [*rec.reasons, "keep the current settings"])
    found = verify(sweep, baseline, rec.config, repeat=repeat, rng=rng)
    return judged(found, rec, result=result)


def judged(found: Verification, rec: Recommendation, *, result: LabResult) -> Recommendation:
    """The verdict on measured rounds, recorded in ``result``: ``rec`` as it is when every
    trial of the candidate beat every trial of the current settings, else no configuration."""
    from tasklab.lab.tune_recommend import Recommendation

    result.add_figures("tune", found.figures())
    result.tables["verification"] = found.rows
    verdict = found.verdict()
    if found.beyond_noise:
        return Recommendation(rec.config, rec.meets_slo, [*rec.reasons, verdict])
    return Recommendation(None, rec.meets_slo, [*rec.reasons, verdict])
