"""``tasklab report``: one self-contained HTML page from lab result JSON files.

Inline CSS, inline SVG charts drawn in Python (``tasklab.lab.charts``) and a few lines of inline
script (sortable tables); nothing is fetched, so the page opens offline and from CI artifacts.
Sections: one SLO table over every result, then per result its latency CDFs, rates and queue
depth over time, worker RSS, the tuner's trial heatmap, ledgers and every other table it
recorded. ``compare`` marks figures that got worse than an older result beyond a tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tasklab.lab import charts
from tasklab.lab.errors import LabError
from tasklab.lab.noise import noise_line
from tasklab.lab.results import format_value, load_result
from tasklab.settings import Settings

DEFAULT_TOLERANCE_PCT = 10.0
_HIGHER_IS_BETTER = (
    "_per_s",
    "success_pct",
    "outcome_match_pct",
    "throughput_ratio",
    "gain_pct",
    "hit_rate",
)
_LOWER_IS_BETTER = (
    "_ms",
    "_us_",
    "miss_rate",
    "_mb",
    "bytes",
    "overhead",
    "inversion",
    "lost",
    "duplicate_effects",
    "errors",
    "makespan_s",
    "_ratio",
)


# --- comparing ------------------------------------------------------------------------------------


def direction(figure: str) -> int | None:
    """+1 when more is better, -1 when less is better, None when a change is not a verdict
    (counts, sizes, CPU share)."""
    if figure.startswith("machine."):  # the rest of the machine, not the system under test
        return None
    name = figure.rsplit(".", 1)[-1]
    if name.endswith(_HIGHER_IS_BETTER) or name.startswith("speedup_"):
        return 1
    if any(part in name for part in _LOWER_IS_BETTER):
        return -1
    return None


@dataclass(frozen=True)
class Change:
    figure: str
    old: float
    new: float
    change_pct: float
    regression: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "old": self.old,
            "new": self.new,
            "change_pct": round(self.change_pct, 2),
            "regression": self.regression,
        }


def compare_figures(
    old: Mapping[str, float],
    new: Mapping[str, float],
    *,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
) -> list[Change]:
    """Every figure both runs have and that has a direction; a regression is a change for
    the worse of more than ``tolerance_pct`` and, for a figure measured in repeated trials
    (``name_min``/``name_max`` beside it in both runs), beyond the spread of both: the new
    run's range lies wholly on the worse side of the old run's."""
    changes = []
    for name, new_value in new.items():
        way = direction(name)
        if name not in old or way is None:
            continue
        old_value = float(old[name])
        if old_value == 0:
            pct = 0.0 if new_value == 0 else 100.0 * (1 if new_value > 0 else -1)
        else:
            pct = (new_value - old_value) / abs(old_value) * 100
        worse = pct * way < -tolerance_pct and not _within_spread(name, old, new, way)
        changes.append(Change(name, old_value, float(new_value), pct, worse))
    return changes


def _within_spread(name: str, old: Mapping[str, float], new: Mapping[str, float], way: int) -> bool:
    """Whether the two runs' ranges of repeated trials overlap (no spread: False)."""
    keys = (f"{name}_min", f"{name}_max")
    if not all(k in old and k in new for k in keys):
        return False
    old_lo, old_hi = float(old[keys[0]]), float(old[keys[1]])
    new_lo, new_hi = float(new[keys[0]]), float(new[keys[1]])
    # More is better: a regression needs the new best below the old worst; less is better:
    # the new best above the old worst.
    return new_hi >= old_lo if way > 0 else new_lo <= old_hi


# --- inputs ---------------------------------------------------------------------------------------


def latest_results(results_dir: Path) -> list[Path]:
    """The newest result file of each command."""
    newest: dict[str, Path] = {}
    for path in sorted(results_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
        command = path.stem.split("-", 1)[0]
        newest[command] = path
    return sorted(newest.values())


# --- rendering ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1b1b;
background:#fafafa}
main{max-width:1360px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:32px 0 8px;border-bottom:2px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f0f0f0;cursor:pointer;user-select:none}
.pass{color:#176b2c;font-weight:600}.fail{color:#b00020;font-weight:700}
.unknown{color:#8a6d00}.regression td{background:#fde7ea}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#fff;border:1px solid #e2e2e2}
svg .title{font-size:13px;font-weight:600}svg .tick,svg .legend{font-size:11px;fill:#444}
svg .label{font-size:12px;fill:#222}svg .grid{stroke:#eee}svg .axis{stroke:#888}
svg .cell-text{font-size:12px}
.meta{color:#555;font-size:12px}.notes li{margin:2px 0}
#script-errors{color:#b00020;white-space:pre-wrap}
"""

_SCRIPT = """
document.addEventListener('DOMContentLoaded', function () {
  var charts = document.querySelectorAll('svg.chart').length;
  document.getElementById('chart-count').textContent = String(charts);
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () { sortTable(table, col); });
    });
  });
  document.body.setAttribute('data-ready', '1');
});
function sortTable(table, col) {
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var asc = table.getAttribute('data-sort') !== col + ':asc';
  rows.sort(function (a, b) {
    var x = a.cells[col].textContent, y = b.cells[col].textContent;
    var nx = parseFloat(x.replace(/,/g, '')), ny = parseFloat(y.replace(/,/g, ''));
    var d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return asc ? d : -d;
  });
  rows.forEach(function (r) { body.appendChild(r); });
  table.setAttribute('data-sort', col + (asc ? ':asc' : ':desc'));
}
"""

# Registered first, so an error in any later script is shown on the page (and tests see it).
_ERROR_TRAP = """
window.addEventListener('error', function (e) {
  var box = document.getElementById('script-errors');
  if (box) { box.textContent += (e.message || 'script error') + '\\n'; }
  document.documentElement.setAttribute('data-script-errors', 'yes');
});
"""


def render_report(
    results: Sequence[Mapping[str, Any]],
    *,
    compare: Mapping[str, Any] | None = None,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
) -> str:
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    sections = [_result_section(r, compare, tolerance_pct) for r in results]
    index = "".join(f'<li><a href="#{_anchor(r)}">{escape(_title(r))}</a></li>' for r in results)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tasklab lab report</title>
<script>{_ERROR_TRAP}</script>
<style>{_CSS}</style></head>
<body><main>
<h1>tasklab lab report</h1>
<p class="meta">generated {generated} from {len(results)} result file(s);
<span id="chart-count">0</span> charts</p>
<div id="script-errors"></div>
<ul>{index}</ul>
<h2 id="slos">Service levels</h2>
{_slo_table(results)}
{"".join(sections)}
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def _anchor(result: Mapping[str, Any]) -> str:
    return f"{result.get('command', 'result')}-{result.get('run_id', '')}"


def _title(result: Mapping[str, Any]) -> str:
    started = datetime.fromtimestamp(float(result.get("started_at", 0)), UTC)
    return f"{result.get('command')} — {started:%Y-%m-%d %H:%M:%S} UTC (run {result.get('run_id')})"


def _slo_table(results: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for r in results:
        for slo in r.get("slos", []):
            rows.append(
                [
                    str(r.get("command")),
                    str(slo["figure"]),
                    format_value(slo["value"]),
                    f"{slo['op']} {format_value(slo['target'])}",
                    _verdict(slo.get("pass")),
                ]
            )
    if not rows:
        return "<p>No targets were checked.</p>"
    return _table(
        ["command", "figure", "value", "target", "pass"], rows, raw_last=True, css="slo sortable"
    )


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return '<span class="unknown">not measured</span>'
    return '<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>'


def _result_section(
    result: Mapping[str, Any], compare: Mapping[str, Any] | None, tolerance_pct: float
) -> str:
    parts = [
        f'<section class="result" id="{escape(_anchor(result))}">',
        f"<h2>{escape(_title(result))}</h2>",
        _meta(result),
    ]
    if compare is not None and compare.get("command") == result.get("command"):
        parts.append(_comparison(result, compare, tolerance_pct))
    parts.append(_charts(result))
    parts.append(_spreads(result.get("figures") or {}))
    for name, rows in (result.get("tables") or {}).items():
        if rows:
            parts.append(f"<h3>{escape(name)}</h3>{_dict_table(rows)}")
    parts.append(_notes(result.get("notes") or []))
    parts.append(_figures(result.get("figures") or {}))
    parts.append("</section>")
    return "\n".join(parts)


def spread_rows(figures: Mapping[str, float]) -> list[tuple[str, float, float, float]]:
    """(figure, min, median, max) of every figure measured in repeated trials."""
    rows = []
    for name, value in figures.items():
        lo, hi = figures.get(f"{name}_min"), figures.get(f"{name}_max")
        if lo is not None and hi is not None and not name.endswith(("_min", "_max")):
            rows.append((name, float(lo), float(value), float(hi)))
    return rows


def _spreads(figures: Mapping[str, float]) -> str:
    rows = spread_rows(figures)
    if not rows:
        return ""
    return charts.spread_chart("repeated trials: median (dot) and spread (min to max)", rows)


def _meta(result: Mapping[str, Any]) -> str:
    machine = result.get("machine") or {}
    versions = result.get("versions") or {}
    params = result.get("params") or {}
    line = (
        f"{machine.get('cores', '?')} cores ({escape(str(machine.get('cpu_model', '?')))}), "
        f"{machine.get('memory_gb', '?')} GB, {escape(str(machine.get('os', '')))}, "
        f"Python {escape(str(machine.get('python', '')))}; "
        f"took {float(result.get('duration_s', 0)):.1f} s"
    )
    noise = noise_line(result.get("figures") or {}, machine.get("load_avg_at_start") or ())
    if noise:
        line += f"; {escape(noise)}"
    details = escape(
        json.dumps(
            {"params": params, "versions": versions, "settings": result.get("settings")},
            indent=1,
            default=str,
        )
    )
    return (
        f'<p class="meta">{line}</p><details><summary>parameters, versions, settings'
        f"</summary><pre>{details}</pre></details>"
    )


def _comparison(result: Mapping[str, Any], old: Mapping[str, Any], tolerance_pct: float) -> str:
    changes = compare_figures(
        old.get("figures") or {}, result.get("figures") or {}, tolerance_pct=tolerance_pct
    )
    regressions = [c for c in changes if c.regression]
    moved = [c for c in changes if abs(c.change_pct) > tolerance_pct]
    head = (
        f"<h3>Compared with run {escape(str(old.get('run_id')))}: {len(regressions)} "
        f"regression(s) beyond {tolerance_pct:g} %</h3>"
    )
    return (
        head
        + _changes_table(moved, "comparison sortable")
        + f"<details><summary>all {len(changes)} compared figures</summary>"
        + _changes_table(changes, "sortable")
        + "</details>"
    )


def _changes_table(changes: Sequence[Change], css: str) -> str:
    if not changes:
        return "<p>No figure moved beyond the tolerance.</p>"
    rows = [
        [
            c.figure,
            format_value(c.old),
            format_value(c.new),
            f"{c.change_pct:+.1f} %",
            '<span class="fail">regression</span>'
            if c.regression
            else "better"
            if c.change_pct * (direction(c.figure) or 0) > 0
            else "",
        ]
        for c in changes
    ]
    return _table(
        ["figure", "old", "new", "change", "verdict"],
        rows,
        raw_last=True,
        css=css,
        row_classes=["regression" if c.regression else "" for c in changes],
    )


def _charts(result: Mapping[str, Any]) -> str:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for series in result.get("series") or []:
        groups.setdefault(str(series["chart"]), []).append(series)
    svgs = [
        charts.line_chart(
            title,
            [(str(s["label"]), [(float(x), float(y)) for x, y in s["points"]]) for s in group],
            x_label=str(group[0]["x_label"]),
            y_label=str(group[0]["y_label"]),
            step=group[0]["kind"] == "cdf",
            # Latency spans decades (log when it does); time runs linearly.
            log_x=None if group[0]["kind"] == "cdf" else False,
            y_from_zero=all(s.get("y_from_zero", True) for s in group),
        )
        for title, group in groups.items()
    ]
    trials = (result.get("tables") or {}).get("trials")
    if trials:
        svgs.append(trial_heatmap(trials, (result.get("tables") or {}).get("recommendation")))
    return f'<div class="charts">{"".join(svgs)}</div>' if svgs else ""


def trial_heatmap(
    trials: Sequence[Mapping[str, Any]], recommendation: Sequence[Mapping[str, Any]] | None
) -> str:
    """Throughput per (pool, prefetch[, bundle]) row and concurrency column; green border:
    meets SLO."""
    measured = [t for t in trials if t.get("status") == "measured"]
    rows = sorted({_trial_row(t) for t in trials})
    columns = [f"x{c}" for c in sorted({int(t["concurrency"]) for t in trials})]
    values = {
        (_trial_row(t), f"x{t['concurrency']}"): float(t["throughput_per_s"]) for t in measured
    }
    marked = {(_trial_row(t), f"x{t['concurrency']}") for t in measured if t.get("meets_slo")}
    best = None
    if recommendation and recommendation[0].get("pool"):
        r = recommendation[0]
        best = (_trial_row(r), f"x{r['concurrency']}")
    return charts.heatmap(
        "tune: throughput per configuration (tasks/s)",
        rows,
        columns,
        values,
        unit="tasks/s",
        marked=marked,
        best=best,
    )


def _trial_row(t: Mapping[str, Any]) -> str:
    """A heatmap row; a jobs-path trial (``tune --dimension jobs``) adds its bundle_max."""
    row = f"{t['pool']} / prefetch {t['prefetch_multiplier']}"
    return f"{row} / bundle {t['bundle_max']}" if "bundle_max" in t else row


def _dict_table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    return _table(columns, cells, css="sortable", escape_cells=False)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "<ul>" + "".join(f"<li>{escape(str(v))}</li>" for v in value) + "</ul>"
    if isinstance(value, bool) or value is None:
        return escape(str(value if value is not None else ""))
    if isinstance(value, int | float):
        return format_value(float(value))
    return escape(str(value))


def _table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    raw_last: bool = False,
    css: str = "",
    escape_cells: bool = True,
    row_classes: Sequence[str] | None = None,
) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        tds = []
        for j, cell in enumerate(row):
            raw = not escape_cells or (raw_last and j == len(row) - 1)
            text = cell if raw else escape(cell)
            num = ' class="num"' if _looks_numeric(cell) else ""
            tds.append(f"<td{num}>{text}</td>")
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>{''.join(tds)}</tr>")
    return (
        f'<table class="{escape(css)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _looks_numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("%", "").replace("+", "").strip()
    try:
        float(stripped)
    except ValueError:
        return False
    return True


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{escape(str(n))}</li>" for n in notes) + "</ul>"


def _figures(figures: Mapping[str, float]) -> str:
    rows = [[name, format_value(value)] for name, value in figures.items()]
    return (
        f"<details><summary>all {len(rows)} figures</summary>"
        f"{_table(['figure', 'value'], rows, css='figures sortable')}</details>"
    )


# --- the command ----------------------------------------------------------------------------------


def build_report(
    paths: Sequence[Path],
    *,
    out: Path,
    compare: Path | None = None,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
) -> Path:
    if not paths:
        raise LabError("no result files to report on; run tasklab stress, bench or tune first")
    results = sorted((load_result(p) for p in paths), key=lambda r: float(r["started_at"]))
    old = load_result(compare) if compare is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(results, compare=old, tolerance_pct=tolerance_pct))
    return out


def run_report(
    settings: Settings,
    *,
    paths: Sequence[Path] = (),
    out: Path | None = None,
    compare: Path | None = None,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
    console: Console | None = None,
) -> Path:
    """Report on ``paths`` (default: the newest result of each command); print regressions."""
    console = console or Console()
    chosen = list(paths) or latest_results(settings.results_dir)
    target = out or settings.home_dir / "report" / "index.html"
    build_report(chosen, out=target, compare=compare, tolerance_pct=tolerance_pct)
    if compare is not None:
        _print_regressions(chosen, compare, tolerance_pct, console)
    console.print(f"report written to {target} ({len(chosen)} result file(s))", highlight=False)
    return target


def regressions(
    paths: Sequence[Path], compare: Path, tolerance_pct: float = DEFAULT_TOLERANCE_PCT
) -> list[Change]:
    old = load_result(compare)
    out: list[Change] = []
    for path in paths:
        new = load_result(path)
        if new.get("command") == old.get("command"):
            out += [
                c
                for c in compare_figures(
                    old["figures"], new["figures"], tolerance_pct=tolerance_pct
                )
                if c.regression
            ]
    return out


def _print_regressions(
    paths: Sequence[Path], compare: Path, tolerance_pct: float, console: Console
) -> None:
    found = regressions(paths, compare, tolerance_pct)
    if not found:
        console.print(f"no regressions beyond {tolerance_pct:g} % against {compare}")
        return
    table = Table(title=f"regressions beyond {tolerance_pct:g} % against {compare.name}")
    for col in ("figure", "old", "new", "change"):
        table.add_column(col, justify="right" if col != "figure" else "left")
    for c in found:
        table.add_row(c.figure, format_value(c.old), format_value(c.new), f"{c.change_pct:+.1f} %")
    console.print(table)
