"""The service-level objectives the burn-rate alerts in deploy/prometheus/ are built on.

deploy/prometheus/rules.yml records each SLO's error ratio over the burn-rate windows and
alerts.yml compares them with the budget below; tests/observe/test_slo.py keeps the rule files,
these numbers and docs/alerts.md in step, so a change to an objective is made here first.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasklab.observe.metrics import LATENCY_BUCKETS_S


@dataclass(frozen=True)
class BurnWindow:
    """One multi-window burn-rate condition (Google SRE workbook, chapter 5): the error
    ratio over both ``long`` and ``short`` windows exceeds ``factor`` times the budget."""

    alert_suffix: str
    long: str
    short: str
    factor: float
    severity: str


@dataclass(frozen=True)
class Objective:
    name: str
    target: float  # fraction of good events, over a 30-day period

    @property
    def budget(self) -> float:
        return round(1.0 - self.target, 6)


# A job is good when it succeeds; bad when it ends DEAD (every attempt failed). Cancelled jobs
# are neither: a cancel is the caller's choice.
JOB_SUCCESS = Objective("job-success", 0.99)
# An attempt is good when it starts within QUEUE_WAIT_THRESHOLD_S of its submit (or retry).
QUEUE_WAIT = Objective("queue-wait", 0.99)
QUEUE_WAIT_THRESHOLD_S = 10.0
assert QUEUE_WAIT_THRESHOLD_S in LATENCY_BUCKETS_S, "the threshold must be a histogram bucket"

# 14.4x spends 2 % of a 30-day budget in 1 h (page); 6x spends 5 % in 6 h (ticket).
BURN_WINDOWS = (
    BurnWindow("Fast", "1h", "5m", 14.4, "critical"),
    BurnWindow("Slow", "6h", "30m", 6.0, "warning"),
)
