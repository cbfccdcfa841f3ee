"""How busy the rest of the machine was while a lab command ran.

The machine's busy CPU time (every core: user, nice, system, irq, softirq, steal) over the
run, less the CPU time of the lab's own process tree (this process, the children it has
reaped and the children still running: workers, API, servers), is what other processes
took. Shown with every result; past ``NOISY_OTHER_PCT`` of the machine the run is called
noisy: its figures are disturbed, and a pass is not a clean pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psutil

NOISY_OTHER_PCT = 20.0  # other processes' share of the whole machine


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    parts = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(t, p, 0.0) for p in parts))


def own_tree_cpu_s() -> float:
    """This process, its reaped children, and its live descendants (with theirs)."""
    me = psutil.Process()
    total = _with_children(me)
    for child in me.children(recursive=True):
        try:
            total += _with_children(child)
        except psutil.Error:  # it ended between the listing and the read
            continue
    return total


def _with_children(process: psutil.Process) -> float:
    t = process.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


@dataclass
class CpuWatch:
    """Started with a result; ``figures`` freezes the span at its first call."""

    started: float = field(default_factory=time.monotonic)
    busy_s: float = field(default_factory=machine_busy_s)
    own_s: float = field(default_factory=own_tree_cpu_s)
    _figures: dict[str, float] | None = None

    def figures(self) -> dict[str, float]:
        if self._figures is None:
            wall_s = max(1e-9, time.monotonic() - self.started)
            cores = os.cpu_count() or 1
            own = max(0.0, own_tree_cpu_s() - self.own_s)
            other = max(0.0, machine_busy_s() - self.busy_s - own)
            self._figures = {
                "lab_cpu_cores": own / wall_s,
                "other_cpu_cores": other / wall_s,
                "other_cpu_pct": min(100.0, 100.0 * other / wall_s / cores),
            }
        return self._figures


def is_noisy(figures: Mapping[str, float]) -> bool:
    return figures.get("machine.other_cpu_pct", 0.0) > NOISY_OTHER_PCT


def noise_line(figures: Mapping[str, float], load_avg: Sequence[float] = ()) -> str:
    """One line for the console: what else ran, and whether that makes the run noisy."""
    pct = figures.get("machine.other_cpu_pct")
    if pct is None:
        return ""
    cores = figures.get("machine.other_cpu_cores", 0.0)
    avg = f" (load average at start {' '.join(f'{x:g}' for x in load_avg)})" if load_avg else ""
    text = (
        f"other processes used {cores:.2f} of {os.cpu_count() or 1} cores ({pct:.0f} %) "
        f"during the run{avg}"
    )
    if is_noisy(figures):
        return f"NOISY run: {text}; its figures are disturbed and a pass is not a clean pass"
    return f"quiet run: {text}"
