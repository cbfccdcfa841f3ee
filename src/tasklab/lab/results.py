"""The result envelope every lab command writes, its SLO checks, and the Rich results table.

A result is one JSON file, ``<home>/results/<command>-<UTC timestamp>.json``::

    {"schema": "tasklab.lab.result/1", "command": "bench", "run_id": "...",
     "started_at": 1700000000.0, "finished_at": ..., "duration_s": ...,
     "params": {...}, "machine": {...}, "versions": {...}, "settings": {...},
     "figures": {"jobs.tasklab_throughput_per_s": 812.4, ...},
     "slos": [{"figure": ..., "value": ..., "target": ..., "op": ">=", "pass": true}],
     "series": [{"chart": ..., "label": ..., "kind": "cdf" | "line", "x_label": ...,
                 "y_label": ..., "points": [[x, y], ...]}],
     "tables": {"trials": [{...}], "ledger.failures": [{...}]}, "notes": ["..."]}

Figures are flat ``<dimension or scenario>.<name>`` numbers with their unit in the name.
"""

from __future__ import annotations

import json
import operator
import os
import platform
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from tasklab.lab.errors import LabError, TargetError
from tasklab.lab.noise import CpuWatch, is_noisy, noise_line
from tasklab.settings import PLAIN_ENV, Settings, mask_url

SCHEMA = "tasklab.lab.result/1"
PACKAGES = (
    "tasklab",
    "celery",
    "kombu",
    "redis",
    "SQLAlchemy",
    "amqp",
    "billiard",
    "fastapi",
    "uvicorn",
    "locust",
)
OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}
_TARGET_RE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(<=|>=|==|<|>|=)\s*([-+0-9.eE]+)\s*$")
# Figures where a smaller number is the better one (latency, memory, losses, overhead).
_LOWER_IS_BETTER = (
    "_ms",
    "_s",
    "_mb",
    "_bytes",
    "lost",
    "duplicate",
    "inversion",
    "overhead",
    "growth",
    "errors",
    "failed",
    "dead",
    "_kb",
)


@dataclass(frozen=True)
class Target:
    """``figure op value``; a figure name without a dot applies to every ``*.figure``."""

    figure: str
    op: str
    value: float

    def applies_to(self, figure: str) -> bool:
        return figure == self.figure or (
            "." not in self.figure and figure.rsplit(".", 1)[-1] == self.figure
        )

    def check(self, value: float) -> bool:
        return OPS[self.op](value, self.value)


@dataclass(frozen=True)
class SloCheck:
    figure: str
    value: float | None
    target: float
    op: str
    passed: bool | None  # False also when the figure was not measured (value None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "value": self.value,
            "target": self.target,
            "op": self.op,
            "pass": self.passed,
        }


@dataclass(frozen=True)
class Series:
    """One line of one chart in the HTML report."""

    chart: str
    label: str
    kind: str  # "cdf" (x = value, y = fraction) or "line" (x = seconds into the run)
    x_label: str
    y_label: str
    points: list[tuple[float, float]]
    y_from_zero: bool = True  # False zooms the y axis in on the values (memory over time)


@dataclass
class LabResult:
    """What a lab command measured; ``write_result`` wraps it in the envelope."""

    command: str
    params: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    slos: list[SloCheck] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    servers: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    path: Path | None = None  # where write_result put it
    # How busy the machine was before the run started (other work shows in the tails).
    load_avg_at_start: list[float] = field(default_factory=lambda: _load_avg())
    # What the rest of the machine took while the command ran (frozen when written).
    cpu: CpuWatch = field(default_factory=CpuWatch, repr=False, compare=False)

    def add_figures(self, prefix: str, figures: Mapping[str, float]) -> None:
        for name, value in figures.items():
            self.figures[f"{prefix}.{name}" if prefix else name] = float(value)

    def check(
        self, targets: Sequence[Target], *, scope: Iterable[str] | None = None
    ) -> list[SloCheck]:
        self.slos = evaluate(self.figures, targets, scope=scope)
        return self.slos

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.slos)

    @property
    def noisy(self) -> bool:
        return is_noisy(self.figures)

    def record_noise(self) -> None:
        """The machine's other CPU load over the run, as ``machine.*`` figures (and a note
        when it makes the run noisy)."""
        if "machine.other_cpu_pct" in self.figures:
            return
        self.add_figures("machine", self.cpu.figures())
        if self.noisy:
            self.notes.append(noise_line(self.figures, self.load_avg_at_start))


# --- targets --------------------------------------------------------------------------------------


def infer_op(figure: str) -> str:
    name = figure.rsplit(".", 1)[-1]
    if name.endswith("_per_s"):
        return ">="
    return "<=" if any(part in name for part in _LOWER_IS_BETTER) else ">="


def parse_target(spec: str, defaults: Sequence[Target] = ()) -> Target:
    """``name=value`` keeps the default's comparison (or infers it from the name);
    ``name<=value``, ``name>value``... state it."""
    match = _TARGET_RE.match(spec)
    if match is None:
        raise TargetError(
            f"--target {spec!r}: expected NAME=VALUE or NAME<=VALUE (also <, >, "
            ">=, ==), e.g. throughput_per_s=200"
        )
    figure, op, raw = match.groups()
    try:
        value = float(raw)
    except ValueError as e:
        raise TargetError(f"--target {spec!r}: {raw!r} is not a number") from e
    if op == "=":
        known = [t for t in defaults if figure in (t.figure, t.figure.rsplit(".", 1)[-1])]
        op = known[0].op if known else infer_op(figure)
    return Target(figure, op, value)


def resolve_targets(defaults: Sequence[Target], overrides: Iterable[str]) -> list[Target]:
    """Defaults with each ``--target`` override replacing the defaults it names."""
    targets = list(defaults)
    for spec in overrides:
        target = parse_target(spec, defaults)
        targets = [t for t in targets if not target.applies_to(t.figure)]
        targets.append(target)
    return targets


def evaluate(
    figures: Mapping[str, float],
    targets: Sequence[Target],
    *,
    scope: Iterable[str] | None = None,
) -> list[SloCheck]:
    """One check per (target, matching figure). A target whose figure was not measured
    fails: a figure missing is no evidence of a pass. ``scope`` names the prefixes (the
    scenarios, dimensions, endpoints) the run set out to measure; a default target of a
    prefix it did not run is left out."""
    ran = None if scope is None else set(scope)
    checks: list[SloCheck] = []
    for target in targets:
        names = [n for n in figures if target.applies_to(n)]
        for name in names:
            value = figures[name]
            checks.append(SloCheck(name, value, target.value, target.op, target.check(value)))
        prefix = target.figure.split(".", 1)[0] if "." in target.figure else None
        if not names and (ran is None or prefix is None or prefix in ran):
            checks.append(SloCheck(target.figure, None, target.value, target.op, False))
    return checks


# --- envelope -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    mem = psutil.virtual_memory()
    return {
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(mem.total / 1e9, 2),
        "cpu_model": _cpu_model(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "load_avg": _load_avg(),
    }


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def settings_snapshot(settings: Settings) -> dict[str, Any]:
    """The settings used, as JSON, with passwords in URLs masked."""
    data = settings.model_dump(mode="json")
    for name in PLAIN_ENV:
        data[name] = mask_url(data.get(name))
    return data


def envelope(result: LabResult, settings: Settings) -> dict[str, Any]:
    finished = result.finished_at or time.time()
    return {
        "schema": SCHEMA,
        "command": result.command,
        "run_id": result.run_id,
        "started_at": result.started_at,
        "finished_at": finished,
        "duration_s": round(finished - result.started_at, 3),
        "params": result.params,
        "machine": {**machine_info(), "load_avg_at_start": result.load_avg_at_start},
        "versions": {**package_versions(), **{f"server.{k}": v for k, v in result.servers.items()}},
        "settings": settings_snapshot(settings),
        "figures": result.figures,
        "slos": [c.to_dict() for c in result.slos],
        "series": [_series_dict(s) for s in result.series],
        "tables": result.tables,
        "notes": result.notes,
    }


def _series_dict(series: Series) -> dict[str, Any]:
    data = asdict(series)
    data["points"] = [[round(x, 6), round(y, 6)] for x, y in series.points]
    return data


def write_result(result: LabResult, settings: Settings) -> Path:
    """Write the envelope to ``settings.results_dir``; return the file's path."""
    if result.finished_at is None:
        result.finished_at = time.time()
    result.record_noise()
    directory = settings.results_dir
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(result.started_at, UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{result.command}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"{result.command}-{stamp}-{n}.json"
    path.write_text(json.dumps(envelope(result, settings), indent=1, default=str) + "\n")
    result.path = path
    return path


def finish(
    result: LabResult,
    settings: Settings,
    *,
    targets: Sequence[Target],
    console: Console,
    scope: Iterable[str] | None = None,
) -> LabResult:
    """Check the targets, write the JSON, print the results table: how every command ends."""
    result.check(targets, scope=scope)
    result.finished_at = time.time()
    write_result(result, settings)
    print_result(result, console, path=result.path)
    return result


def load_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LabError(f"cannot read result {path}: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise LabError(f"{path} is not a tasklab lab result ({SCHEMA})")
    return data


# --- printing -------------------------------------------------------------------------------------


def format_value(value: float | None) -> str:
    if value is None:
        return "—"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _worth_a_row(name: str, value: float | None) -> bool:
    """The table leaves out maxima and zero counts of bad outcomes (the JSON has them)."""
    last = name.rsplit(".", 1)[-1]
    if last.endswith("_max"):
        return False
    return not (value == 0 and last.endswith(_ZERO_HIDDEN))


_ZERO_HIDDEN = ("failed", "dead", "cancelled", "lost", "errors")


def results_table(
    figures: Mapping[str, float],
    slos: Sequence[Mapping[str, Any]],
    *,
    title: str,
    compact: bool = True,
) -> Table:
    """figure | value | target | pass: the figures (``compact``: the telling ones), each with
    its target where it has one."""
    by_figure: dict[str, list[Mapping[str, Any]]] = {}
    for slo in slos:
        by_figure.setdefault(str(slo["figure"]), []).append(slo)
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("pass")
    noisy = is_noisy(figures)
    for name in [*figures, *(n for n in by_figure if n not in figures)]:
        checks = by_figure.get(name) or [{}]
        if compact and name not in by_figure and not _worth_a_row(name, figures.get(name)):
            continue
        for slo in checks:
            target = f"{slo['op']} {format_value(slo['target'])}" if slo else ""
            table.add_row(name, format_value(figures.get(name)), target, _verdict(slo, noisy))
    return table


def _verdict(slo: Mapping[str, Any], noisy: bool = False) -> str:
    if not slo:
        return ""
    if slo.get("value") is None:
        return "[bold red]FAIL (not measured)[/]"
    if not slo["pass"]:
        return "[bold red]FAIL[/]"
    return "[yellow]pass (noisy run)[/]" if noisy else "[green]pass[/]"


def print_result(
    result: LabResult | Mapping[str, Any], console: Console, *, path: Path | None = None
) -> None:
    data: Mapping[str, Any] = (
        result
        if isinstance(result, Mapping)
        else {
            "command": result.command,
            "figures": result.figures,
            "notes": result.notes,
            "slos": [c.to_dict() for c in result.slos],
        }
    )
    console.print(results_table(data["figures"], data["slos"], title=f"tasklab {data['command']}"))
    load_avg = result.load_avg_at_start if isinstance(result, LabResult) else ()
    line = noise_line(data["figures"], load_avg)
    if line and not any(n.startswith("NOISY run") for n in data.get("notes", [])):
        console.print(f"[dim]machine:[/] {line}", highlight=False)
    for note in data.get("notes", []):
        console.print(f"[dim]note:[/] {note}", highlight=False)
    if path is not None:
        console.print(f"results written to {path}", highlight=False)
