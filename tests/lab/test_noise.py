"""The machine's other CPU load during a lab run: the lab's own process tree is not counted
as noise, every result carries it, and a noisy pass says so."""

from __future__ import annotations

import subprocess
import sys
import time

from rich.console import Console

from tasklab.lab.noise import NOISY_OTHER_PCT, CpuWatch, noise_line
from tasklab.lab.results import LabResult, Target, print_result, write_result
from tasklab.settings import Settings
from tests.lab.helpers import printed, read_json

# A child that burns half a second of its own CPU time (not of wall time: a busy machine
# only makes it take longer).
BURN = "import time\nwhile time.process_time() < 0.5:\n    pass\n"


def test_cpu_used_by_the_labs_own_children_is_not_counted_as_other_load() -> None:
    started = time.monotonic()
    watch = CpuWatch()
    subprocess.run([sys.executable, "-c", BURN], check=True)
    figures = watch.figures()
    wall_s = time.monotonic() - started  # at least the watch's span
    assert figures["lab_cpu_cores"] * wall_s >= 0.5
    assert figures["other_cpu_cores"] >= 0 and 0 <= figures["other_cpu_pct"] <= 100
    assert watch.figures() is figures  # frozen at the first reading


def test_a_noisy_run_says_so_and_its_passes_are_not_clean(
    lab_settings: Settings, console: Console
) -> None:
    quiet = {"machine.other_cpu_pct": 1.0, "machine.other_cpu_cores": 0.02}
    noisy = {"machine.other_cpu_pct": NOISY_OTHER_PCT + 30, "machine.other_cpu_cores": 1.0}
    assert noise_line(quiet, [0.5, 0.4, 0.3]).startswith("quiet run: other processes used 0.02")
    assert noise_line(noisy).startswith("NOISY run:") and "not a clean pass" in noise_line(noisy)
    assert noise_line({}) == ""

    result = LabResult("stress", figures={"fast.throughput_per_s": 10.0, **noisy})
    result.check([Target("fast.throughput_per_s", ">=", 1.0)])
    write_result(result, lab_settings)
    print_result(result, console)
    shown = printed(console)
    assert "pass (noisy run)" in shown and "NOISY run" in shown


def test_every_written_result_carries_the_machines_other_load(
    lab_settings: Settings, console: Console
) -> None:
    result = LabResult("bench", figures={"submit.latency_ms_p50": 1.0})
    data = read_json(write_result(result, lab_settings))
    assert {"machine.other_cpu_pct", "machine.other_cpu_cores", "machine.lab_cpu_cores"} <= set(
        data["figures"]
    )
    noisy = data["figures"]["machine.other_cpu_pct"] > NOISY_OTHER_PCT
    assert any(n.startswith("NOISY run") for n in data["notes"]) is noisy
    print_result(result, console)
    assert ("NOISY run" if noisy else "quiet run") in printed(console)
