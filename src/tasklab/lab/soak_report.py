"""The soak drill's figures, tables, notes and charts, from its job records and verdicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasklab.lab import summary
from tasklab.lab.results import LabResult, Series
from tasklab.lab.soak_bound import FINAL, Verdict
from tasklab.lab.soak_faults import BacklogSampler, OpenLoop
from tasklab.lab.stats import percentiles as _percentiles
from tasklab.lab.workload import Sample

SOAK = "soak"
GROUPS = ("worker_running", "worker_reserved", "relay", "terminated")
LEDGER_ROW = (
    "submitted",
    "accepted",
    "succeeded",
    "dead",
    "cancelled",
    "lost",
    "stuck",
    "duplicate_effects",
    "missing_effects",
    "over_bound",
    "worker_exits",
)
Rows = dict[str, dict[str, Any]]


def percentiles(values: Sequence[float], prefix: str) -> dict[str, float]:
    return _percentiles([max(0.0, v) for v in values], prefix)


def timing(rows: Rows, loop: OpenLoop, carried: set[str]) -> dict[str, float]:
    """Queue wait and end to end latency (seconds) of the jobs offered that no fault touched
    (one attempt, from the broker, succeeded); the rate served while offering; the drain."""
    plain = [
        r
        for j, r in rows.items()
        if j not in carried
        and r["status"] == "SUCCEEDED"
        and r["attempt"] == 1
        and r["via"] == "broker"
        and r["started_at"] is not None
    ]
    out: dict[str, float] = {}
    if plain:
        out.update(percentiles([r["started_at"] - r["created_at"] for r in plain], "queue_wait_s"))
        out.update(percentiles([r["finished_at"] - r["created_at"] for r in plain], "e2e_s"))
    finished = [r["finished_at"] for r in rows.values() if r["finished_at"] is not None]
    span = max(1e-9, loop.ended_at - loop.started_at)
    out["served_per_s"] = sum(1 for f in finished if f <= loop.ended_at) / span
    out["drain_s"] = max(0.0, max(finished, default=loop.ended_at) - loop.ended_at)
    return out


def bound_figures(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """``over_bound`` (the target), and per carrier: jobs, worst latency and margin."""
    out: dict[str, float] = {
        "carried": len(verdicts),
        "over_bound": sum(1 for v in verdicts if v.over),
        "carrier_latency_s_max": max((v.latency_s or 0.0 for v in verdicts), default=0.0),
    }
    for group in GROUPS:
        mine = [v for v in verdicts if v.group == group]
        if not mine:
            continue
        out[f"{group}_jobs"] = len(mine)
        out[f"{group}_over_bound"] = sum(1 for v in mine if v.over)
        out[f"{group}_latency_s_max"] = max(v.latency_s or 0.0 for v in mine)
        out[f"{group}_queue_wait_s"] = max(v.queue_wait_s for v in mine)
        out[f"{group}_bound_s_min"] = min(v.bound_s for v in mine)
        margins = [v.margin_s for v in mine if v.margin_s is not None]
        out[f"{group}_margin_s_min"] = min(margins) if margins else -1.0
    return out


def evidence(rows: Rows, verdicts: Sequence[Verdict], unexpected: Sequence[str]) -> list[str]:
    """Notes that name jobs: a few past their bound, dead, not final, cancelled unasked."""
    notes = []
    for v in [v for v in verdicts if v.over][:8]:
        latency = "is not finished" if v.latency_s is None else f"took {v.latency_s:.1f} s"
        notes.append(
            f"soak: job {v.job_id} ({v.group}) {latency} from its fault, bound {v.bound_s:.1f} s "
            f"(queue wait {v.queue_wait_s:.1f} s, run {v.run_s:.1f} s); status {v.status}, "
            f"attempt {rows.get(v.job_id, {}).get('attempt')}"
        )
    dead = [j for j, r in rows.items() if r["status"] == "DEAD"]
    if dead:
        notes.append(f"soak: {len(dead)} job(s) DEAD, e.g. {', '.join(dead[:5])}")
    stuck = [(j, r["status"]) for j, r in rows.items() if r["status"] not in FINAL]
    if stuck:
        shown = ", ".join(f"{j} {status}" for j, status in stuck[:5])
        notes.append(f"soak: {len(stuck)} job(s) not final at the end, e.g. {shown}")
    if unexpected:
        notes.append(f"soak: cancelled without a cancel: {', '.join(unexpected[:5])}")
    return notes


def record(
    result: LabResult,
    figures: dict[str, float],
    verdicts: Sequence[Verdict],
    events: list[dict[str, Any]],
    *,
    t0: float,
) -> None:
    """The ledger table's row, the faults' timeline and one row per carrier."""
    row: dict[str, Any] = {"drill": SOAK, **{k: figures.get(k, 0.0) for k in LEDGER_ROW}}
    row["recover_s"] = round(figures.get("carrier_latency_s_max", 0.0), 3)
    result.tables.setdefault("ledger", []).append(row)
    result.tables["soak faults"] = events
    result.tables["soak carriers"] = [
        {
            "carrier": group,
            "jobs": len(mine),
            "fault_at_s": round(min(v.fault_at for v in mine) - t0, 2),
            "queue_wait_s": round(max(v.queue_wait_s for v in mine), 2),
            "bound_s_min": round(min(v.bound_s for v in mine), 2),
            "latency_s_max": round(max(v.latency_s or -1.0 for v in mine), 2),
            "over_bound": sum(1 for v in mine if v.over),
        }
        for group in GROUPS
        if (mine := [v for v in verdicts if v.group == group])
    ]


def series(backlog: BacklogSampler, rows: Rows, *, t0: float) -> list[Series]:
    """Completions per second of the offered jobs, the backlog in jobs and in messages."""
    samples = [
        Sample(j, "succeeded", r["created_at"], r["started_at"], r["finished_at"])
        for j, r in rows.items()
        if r["finished_at"] is not None
    ]
    done = summary.completions_over_time(samples, bucket_s=1.0, t0=t0)
    return [
        Series("drill: completions per second", SOAK, "line", "seconds", "jobs/s", done),
        Series("soak: backlog", "jobs not finished", "line", "seconds", "jobs", backlog.jobs),
        Series("soak: backlog", "messages waiting", "line", "seconds", "messages", backlog.depth),
    ]
