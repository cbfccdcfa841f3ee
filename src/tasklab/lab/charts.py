"""Inline SVG charts for the HTML report, drawn here in Python: no script, no CDN, no network.

Each function returns one ``<svg class="chart">`` element as a string; every value shown is
escaped, and every point carries a ``<title>`` so hovering shows the number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from html import escape

WIDTH, HEIGHT = 640, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 28, 46
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)
LEGEND_PER_ROW = 4
Points = Sequence[tuple[float, float]]
_ids = itertools.count(1)  # unique clip-path ids within one page


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = [round(math.floor(lo / step) * step, 10)]
    while ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0**e for e in range(first, last + 1)]


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


class _Axes:
    """Maps data to pixels for one plot area."""

    def __init__(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        log_x: bool,
        y_from_zero: bool,
        top: int = MARGIN_T,
    ) -> None:
        self.log_x = log_x
        self.top = top
        x_lo, x_hi = min(xs), max(xs)
        if log_x:
            self.x_ticks = log_ticks(x_lo, x_hi)
        else:
            self.x_ticks = nice_ticks(x_lo, x_hi)
        y_lo = 0.0 if y_from_zero else min(ys)
        self.y_ticks = nice_ticks(min(y_lo, min(ys)), max(ys))
        self.x0, self.x1 = self.x_ticks[0], self.x_ticks[-1]
        self.y0, self.y1 = self.y_ticks[0], self.y_ticks[-1]

    def px(self, x: float) -> float:
        if self.log_x:
            lo, hi, x = math.log10(self.x0), math.log10(self.x1), math.log10(max(x, self.x0))
        else:
            lo, hi = self.x0, self.x1
        span = (hi - lo) or 1.0
        return MARGIN_L + (x - lo) / span * (WIDTH - MARGIN_L - MARGIN_R)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return HEIGHT - MARGIN_B - (y - self.y0) / span * (HEIGHT - self.top - MARGIN_B)


def line_chart(
    title: str,
    lines: Sequence[tuple[str, Points]],
    *,
    x_label: str,
    y_label: str,
    step: bool = False,
    log_x: bool | None = None,
    y_from_zero: bool = True,
) -> str:
    """Lines (or steps, for CDFs) sharing axes; ``log_x`` None picks log when x spans > 50x."""
    lines = [(label, list(points)) for label, points in lines if points]
    if not lines:
        return _empty(title)
    xs = [x for _, pts in lines for x, _ in pts]
    ys = [y for _, pts in lines for _, y in pts]
    positive = min(xs) > 0
    use_log = (positive and max(xs) / min(xs) > 50) if log_x is None else (log_x and positive)
    legend_rows = math.ceil(len(lines) / LEGEND_PER_ROW)
    axes = _Axes(xs, ys, log_x=use_log, y_from_zero=y_from_zero, top=MARGIN_T + 14 * legend_rows)
    clip = f"clip{next(_ids)}"
    parts = [
        _frame(title, axes, x_label + (" (log)" if use_log else ""), y_label),
        f'<clipPath id="{clip}"><rect x="{MARGIN_L}" y="{axes.top - 3}" '
        f'width="{WIDTH - MARGIN_L - MARGIN_R + 3}" '
        f'height="{HEIGHT - MARGIN_B - axes.top + 6}"/></clipPath>',
    ]
    for i, (label, pts) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<g clip-path="url(#{clip})">{_polyline(axes, pts, color, step=step, label=label)}</g>'
        )
        parts.append(_legend_entry(i, label, color))
    return _svg(title, parts)


def _polyline(axes: _Axes, points: Points, color: str, *, step: bool, label: str) -> str:
    coords: list[str] = []
    prev_y: float | None = None
    for x, y in points:
        if step and prev_y is not None:
            coords.append(f"{axes.px(x):.1f},{axes.py(prev_y):.1f}")
        coords.append(f"{axes.px(x):.1f},{axes.py(y):.1f}")
        prev_y = y
    dots = "".join(
        f'<circle cx="{axes.px(x):.1f}" cy="{axes.py(y):.1f}" r="2" fill="{color}">'
        f"<title>{escape(label)}: {fmt(x)}, {fmt(y)}</title></circle>"
        for x, y in _thin(points, 60)
    )
    return (
        f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.8" '
        f'points="{" ".join(coords)}"><title>{escape(label)}</title></polyline>{dots}'
    )


def _thin(points: Points, keep: int) -> Points:
    step = max(1, len(points) // keep)
    return points[::step]


def _frame(title: str, axes: _Axes, x_label: str, y_label: str) -> str:
    out = [
        f'<text class="title" x="{WIDTH / 2}" y="18" text-anchor="middle">{escape(title)}</text>'
    ]
    bottom, top = HEIGHT - MARGIN_B, axes.top
    for t in axes.y_ticks:
        y = axes.py(t)
        out.append(
            f'<line class="grid" x1="{MARGIN_L}" x2="{WIDTH - MARGIN_R}" y1="{y:.1f}" '
            f'y2="{y:.1f}"/><text class="tick" x="{MARGIN_L - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{fmt(t)}</text>'
        )
    for t in axes.x_ticks:
        x = axes.px(t)
        out.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}"/>'
            f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
            f"{fmt(t)}</text>"
        )
    out.append(
        f'<line class="axis" x1="{MARGIN_L}" x2="{WIDTH - MARGIN_R}" y1="{bottom}" '
        f'y2="{bottom}"/><line class="axis" x1="{MARGIN_L}" x2="{MARGIN_L}" '
        f'y1="{top}" y2="{bottom}"/>'
    )
    out.append(
        f'<text class="label" x="{(MARGIN_L + WIDTH - MARGIN_R) / 2}" '
        f'y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>'
    )
    out.append(
        f'<text class="label" transform="translate(14,{(top + bottom) / 2}) rotate(-90)"'
        f' text-anchor="middle">{escape(y_label)}</text>'
    )
    return "".join(out)


def _legend_entry(index: int, label: str, color: str) -> str:
    x = MARGIN_L + (index % LEGEND_PER_ROW) * 130
    y = MARGIN_T + 4 + (index // LEGEND_PER_ROW) * 14
    return (
        f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
        f'<text class="legend" x="{x + 14}" y="{y + 1}">{escape(label[:20])}</text>'
    )


def heatmap(
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    values: dict[tuple[str, str], float],
    *,
    unit: str,
    marked: Collection[tuple[str, str]] = (),
    best: tuple[str, str] | None = None,
) -> str:
    """A grid of cells shaded by value (darker = more); ``marked`` cells get a green border
    (they meet the SLO), ``best`` a star."""
    if not values:
        return _empty(title)
    cell_w = min(120, (WIDTH - 140) / max(1, len(columns)))
    cell_h = 34
    height = MARGIN_T + 30 + cell_h * len(rows) + 10
    lo, hi = min(values.values()), max(values.values())
    parts = [
        f'<text class="title" x="{WIDTH / 2}" y="18" text-anchor="middle">{escape(title)}</text>'
    ]
    for j, col in enumerate(columns):
        parts.append(
            f'<text class="tick" x="{140 + (j + 0.5) * cell_w:.1f}" y="{MARGIN_T + 16}"'
            f' text-anchor="middle">{escape(col)}</text>'
        )
    for i, row in enumerate(rows):
        y = MARGIN_T + 24 + i * cell_h
        parts.append(
            f'<text class="tick" x="132" y="{y + cell_h / 2 + 4:.1f}" '
            f'text-anchor="end">{escape(row)}</text>'
        )
        for j, col in enumerate(columns):
            parts.append(
                _cell(
                    140 + j * cell_w,
                    y,
                    cell_w,
                    cell_h,
                    values.get((row, col)),
                    lo,
                    hi,
                    unit=unit,
                    ok=(row, col) in marked,
                    star=best == (row, col),
                    name=f"{row} / {col}",
                )
            )
    return _svg(title, parts, height=height, css_class="chart heatmap")


def _cell(
    x: float,
    y: float,
    w: float,
    h: float,
    value: float | None,
    lo: float,
    hi: float,
    *,
    unit: str,
    ok: bool,
    star: bool,
    name: str,
) -> str:
    if value is None:
        return (
            f'<rect x="{x:.1f}" y="{y}" width="{w - 2:.1f}" height="{h - 2}" '
            'fill="#eeeeee"><title>not measured</title></rect>'
        )
    share = (value - lo) / (hi - lo) if hi > lo else 1.0
    light = 92 - 52 * share
    text_color = "#ffffff" if light < 60 else "#111111"
    stroke = ' stroke="#2ca02c" stroke-width="3"' if ok else ""
    label = f"{'★ ' if star else ''}{fmt(value)}"
    return (
        f'<rect class="cell" x="{x:.1f}" y="{y}" width="{w - 2:.1f}" height="{h - 2}" '
        f'fill="hsl(210,70%,{light:.0f}%)"{stroke}><title>{escape(name)}: {fmt(value)} '
        f'{escape(unit)}</title></rect><text x="{x + w / 2:.1f}" y="{y + h / 2 + 4:.1f}" '
        f'text-anchor="middle" fill="{text_color}" class="cell-text">{escape(label)}</text>'
    )


def _svg(
    title: str, parts: Sequence[str], *, height: int = HEIGHT, css_class: str = "chart"
) -> str:
    return (
        f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        f'aria-label="{escape(title)}">{"".join(parts)}</svg>'
    )


def _empty(title: str) -> str:
    return _svg(
        title,
        [
            f'<text class="title" x="{WIDTH / 2}" y="18" text-anchor="middle">'
            f'{escape(title)}</text><text x="{WIDTH / 2}" y="{HEIGHT / 2}" '
            'text-anchor="middle" class="tick">no data</text>'
        ],
    )


SPREAD_ROW_H = 22
SPREAD_LABEL_W = 280


def spread_chart(title: str, rows: Sequence[tuple[str, float, float, float]]) -> str:
    """One row per figure of repeated trials: its range (min to max) as a bar, its median as
    a dot, on a scale from 0 to the row's max (each row its own: the units differ)."""
    if not rows:
        return _empty(title)
    height = MARGIN_T + SPREAD_ROW_H * len(rows) + 10
    span_w = WIDTH - SPREAD_LABEL_W - MARGIN_R - 90
    parts = [
        f'<text class="title" x="{WIDTH / 2}" y="18" text-anchor="middle">{escape(title)}</text>'
    ]
    for i, (name, lo, mid, hi) in enumerate(rows):
        y = MARGIN_T + SPREAD_ROW_H * i + SPREAD_ROW_H / 2
        scale = span_w / (hi * 1.05) if hi > 0 else 0.0
        x0 = SPREAD_LABEL_W + lo * scale
        x1 = SPREAD_LABEL_W + hi * scale
        xm = SPREAD_LABEL_W + mid * scale
        tip = f"{name}: median {fmt(mid)} (min {fmt(lo)}, max {fmt(hi)})"
        parts.append(
            f'<text class="tick" x="{SPREAD_LABEL_W - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(name)}</text>"
            f'<line x1="{SPREAD_LABEL_W}" x2="{SPREAD_LABEL_W + span_w}" y1="{y:.1f}" '
            f'y2="{y:.1f}" stroke="#eeeeee"/>'
            f'<line x1="{x0:.1f}" x2="{max(x1, x0 + 1):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{PALETTE[0]}" stroke-width="6"><title>{escape(tip)}</title></line>'
            f'<circle cx="{xm:.1f}" cy="{y:.1f}" r="4" fill="{PALETTE[1]}">'
            f"<title>{escape(tip)}</title></circle>"
            f'<text class="tick" x="{SPREAD_LABEL_W + span_w + 6}" y="{y + 4:.1f}">'
            f"{escape(f'{fmt(mid)} ({fmt(lo)} to {fmt(hi)})')}</text>"
        )
    return _svg(title, parts, height=height)
