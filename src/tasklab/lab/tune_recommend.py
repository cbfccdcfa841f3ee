"""``tasklab tune``, step 3: the recommendation from the measured trials, with the comparisons
that justify it, and ``write_config``, which writes it as an env file or a Celery config
module."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from tasklab.lab.errors import LabError
from tasklab.lab.harness import WorkerConfig
from tasklab.lab.tune_sweep import JobsConfig, Trial

MIN_SUCCESS_PCT = 95.0
CLOSE_CALL_PCT = 5.0  # throughput gaps below this are within one short trial's noise


@dataclass(frozen=True)
class Recommendation:
    config: WorkerConfig | None
    meets_slo: bool
    reasons: list[str]


def recommend(
    trials: Sequence[Trial], *, slo_ms: float, baseline: WorkerConfig | None = None
) -> Recommendation:
    measured = [t for t in trials if t.status == "measured" and t.success_pct >= MIN_SUCCESS_PCT]
    if not measured:
        return Recommendation(None, False, ["no trial completed; nothing to recommend"])
    ok = [t for t in measured if t.latency_ms_p95 <= slo_ms]
    rate = measured[0].rate_per_s
    if ok:
        best = max(ok, key=lambda t: t.throughput_per_s)
        reasons = [
            f"{best.label}: {best.throughput_per_s:,.0f} tasks/s, the best throughput of "
            f"the {len(ok)} of {len(measured)} configurations whose P95 queue wait at "
            f"{rate:,.0f} tasks/s stays within {slo_ms:g} ms "
            f"({best.latency_ms_p95:.1f} ms)"
        ]
    else:
        best = min(measured, key=lambda t: t.latency_ms_p95)
        reasons = [
            f"no configuration kept P95 queue wait within {slo_ms:g} ms at {rate:,.0f} "
            f"tasks/s; {best.label} came closest ({best.latency_ms_p95:.1f} ms): add "
            "workers or make the tasks shorter"
        ]
    reasons += _close_call(best, ok)
    reasons += _comparisons(best, measured, baseline)
    return Recommendation(best.config, bool(ok), reasons)


def _close_call(best: Trial, candidates: Sequence[Trial]) -> list[str]:
    """Name a runner-up within the noise of one short trial, so nobody over-reads the pick."""
    others = [t for t in candidates if t is not best]
    if not others or not best.throughput_per_s:
        return []
    second = max(others, key=lambda t: t.throughput_per_s)
    gap_pct = (1 - second.throughput_per_s / best.throughput_per_s) * 100
    if gap_pct >= CLOSE_CALL_PCT:
        return []
    return [
        f"{second.label} is within {gap_pct:.0f} % ({second.throughput_per_s:,.0f} tasks/s): "
        "treat them as equal, or rerun with a larger --burst to separate them"
    ]


def _comparisons(
    best: Trial, measured: Sequence[Trial], baseline: WorkerConfig | None
) -> list[str]:
    out = []
    base = next((t for t in measured if t.config == baseline), None)
    if base is not None and base is not best and base.throughput_per_s:
        gain = (best.throughput_per_s / base.throughput_per_s - 1) * 100
        out.append(
            f"{gain:+.0f} % throughput against the current settings ({base.label}: "
            f"{base.throughput_per_s:,.0f} tasks/s, P95 queue wait "
            f"{base.latency_ms_p95:.1f} ms)"
        )
    by_pool: dict[str, Trial] = {}
    for t in measured:
        if (
            t.config.pool not in by_pool
            or t.throughput_per_s > by_pool[t.config.pool].throughput_per_s
        ):
            by_pool[t.config.pool] = t
    if len(by_pool) > 1:
        out.append(
            "best per pool: "
            + ", ".join(
                f"{pool} {t.throughput_per_s:,.0f}/s ({t.label})" for pool, t in by_pool.items()
            )
        )
    out += _knob_effect(best, measured, "prefetch_multiplier", "prefetch")
    out += _knob_effect(best, measured, "concurrency", "concurrency")
    if isinstance(best.config, JobsConfig):
        out += _knob_effect(best, measured, "bundle_max", "bundle_max")
    return out


def _knob_effect(best: Trial, measured: Sequence[Trial], knob: str, name: str) -> list[str]:
    """How the best configuration fares when only ``knob`` changes."""
    others = [
        t
        for t in measured
        if t is not best
        and all(
            getattr(t.config, k, None) == getattr(best.config, k)
            for k in (f.name for f in fields(best.config))  # a jobs config adds bundle_max
            if k != knob
        )
    ]
    return [
        f"{name} {getattr(best.config, knob)} vs {getattr(t.config, knob)}: "
        f"{best.throughput_per_s:,.0f} vs {t.throughput_per_s:,.0f} tasks/s, P95 queue wait "
        f"{best.latency_ms_p95:.1f} vs {t.latency_ms_p95:.1f} ms"
        for t in others
    ]


def write_config(path: Path, config: WorkerConfig, *, comment: str) -> Path:
    """``*.py``: a Celery config module (``app.config_from_object``); anything else: an env
    file of ``TASKLAB_WORKER_*`` variables (and ``TASKLAB_BUNDLE_MAX`` for the jobs path)."""
    path = Path(path)
    check_writable(path, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".py":
        text = (
            f'"""Celery worker settings recommended by `tasklab tune`.\n\n{comment}\n\n'
            'Load with ``app.config_from_object("<this module>")``.\n"""\n\n'
            f"worker_pool = {config.pool!r}\nworker_concurrency = {config.concurrency}\n"
            f"worker_prefetch_multiplier = {config.prefetch_multiplier}\n"
        )
    else:
        lines = [f"# {line}" for line in comment.splitlines()]
        text = "\n".join(
            [
                *lines,
                f"TASKLAB_WORKER_POOL={config.pool}",
                f"TASKLAB_WORKER_CONCURRENCY={config.concurrency}",
                f"TASKLAB_WORKER_PREFETCH_MULTIPLIER={config.prefetch_multiplier}",
                *(
                    [f"TASKLAB_BUNDLE_MAX={config.bundle_max}"]
                    if isinstance(config, JobsConfig)
                    else []
                ),
                "",
            ]
        )
    path.write_text(text)
    return path


def check_writable(path: Path, config: WorkerConfig) -> None:
    """A Celery config module cannot carry ``bundle_max``: it is a tasklab setting."""
    if isinstance(config, JobsConfig) and Path(path).suffix == ".py":
        raise LabError(
            f"--write {path}: the jobs path's bundle_max is a tasklab setting; write an env "
            "file (e.g. --write worker.env), not a Celery config module"
        )
