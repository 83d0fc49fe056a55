"""Inline SVG charts for the curator report: no plotting library, no scripts, nothing fetched.
Every chart is a self-contained <svg> string with <title> tooltips on its marks."""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

# One colour per encoder (by position), shared by every chart and badge of the report.
PALETTE = ("#3b6fd8", "#d9822b", "#2f9e6e", "#b04fc4", "#c94a4a", "#6c7a89")
MUTED = "#c4ccd6"
BAND = "#e6f4ea"
INK = "#1f2933"
GRID = "#e4e8ee"


def fmt_int(n: float | int | None) -> str:
    return "–" if n is None else f"{int(round(n)):,}"


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _axis_label(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value / 1000:g}k" if value < 1e6 else f"{value / 1e6:g}M"
    return f"{value:g}"


def _open(width: int, height: int, label: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
            f"<title>{escape(label)}</title>")


def hbars(rows: Sequence[tuple[str, float, str]], label: str, width: int = 560,
          label_width: int = 190, bar_height: int = 22) -> str:
    """Horizontal bars: (label, value, colour) per row, values printed at the bar ends."""
    height = bar_height * len(rows) + 8
    top = max((v for _, v, _ in rows), default=0) or 1
    area = width - label_width - 80
    out = [_open(width, height, label)]
    for i, (name, value, colour) in enumerate(rows):
        y = 4 + i * bar_height
        w = max(1.0, area * value / top) if value else 0
        out.append(
            f'<text x="{label_width - 8}" y="{y + bar_height * 0.68:.1f}" text-anchor="end" '
            f'class="lbl">{escape(name)}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{w:.1f}" height="{bar_height - 6}" rx="3" '
            f'fill="{colour}"><title>{escape(name)}: {fmt_int(value)}</title></rect>'
            f'<text x="{label_width + w + 6:.1f}" y="{y + bar_height * 0.68:.1f}" class="val">'
            f"{fmt_int(value)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _y_axis(out: list[str], top: float, left: int, right: int, y0: float, plot_h: float) -> None:
    step = _nice_step(top, 4)
    tick = 0.0
    while tick <= top * 1.0001:
        y = y0 - plot_h * tick / top
        out.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                   f"{_axis_label(tick)}</text>")
        tick += step


def histogram(edges: Sequence[float], series: Sequence[tuple[str, Sequence[float], str]],
              label: str, band: tuple[float, float] | None = None, x_label: str = "",
              width: int = 560, height: int = 210) -> str:
    """Overlaid histograms on shared bin `edges`: (name, counts, colour) per series, drawn in
    order; `band` shades an x interval (the mining band)."""
    left, right, top_pad, bottom = 52, 12, 22, 40
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    x = lambda v: left + plot_w * (v - lo) / span  # noqa: E731
    y0 = top_pad + plot_h
    top = max((max(c, default=0) for _, c, _ in series), default=0) or 1
    out = [_open(width, height, label)]
    _y_axis(out, top, left, width - right, y0, plot_h)
    if band:
        b0, b1 = max(band[0], lo), min(band[1], hi)
        if b1 > b0:
            out.append(f'<rect x="{x(b0):.1f}" y="{top_pad}" width="{x(b1) - x(b0):.1f}" height="{plot_h}" '
                       f'fill="{BAND}"><title>band ({band[0]:g}, {band[1]:g})</title></rect>'
                       f'<text x="{(x(b0) + x(b1)) / 2:.1f}" y="{top_pad - 6}" text-anchor="middle" '
                       f'class="tick band">band</text>')
    for name, counts, colour in series:
        for i, c in enumerate(counts):
            if not c:
                continue
            h = plot_h * c / top
            out.append(f'<rect x="{x(edges[i]):.1f}" y="{y0 - h:.1f}" '
                       f'width="{max(x(edges[i + 1]) - x(edges[i]) - 0.6, 0.6):.1f}" height="{h:.1f}" '
                       f'fill="{colour}"><title>{escape(name)} {edges[i]:.2f}–{edges[i + 1]:.2f}: '
                       f"{fmt_int(c)}</title></rect>")
    if band:
        for edge in band:
            if lo <= edge <= hi:
                out.append(f'<line x1="{x(edge):.1f}" x2="{x(edge):.1f}" y1="{top_pad}" y2="{y0}" '
                           f'stroke="#2f9e6e" stroke-dasharray="4 3"/>')
    step = _nice_step(span, 6)
    tick = math.ceil(lo / step) * step
    while tick <= hi + 1e-9:
        out.append(f'<text x="{x(tick):.1f}" y="{y0 + 15}" text-anchor="middle" class="tick">{tick:.2f}</text>')
        tick += step
    return _close(out, left, width - right, y0, height, x_label)


def vbars(labels: Sequence[str], values: Sequence[float], label: str, colour: str = PALETTE[0],
          x_label: str = "", width: int = 420, height: int = 190) -> str:
    """Vertical bars for a small categorical or integer distribution."""
    left, right, top_pad, bottom = 52, 10, 12, 40
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    n = max(len(values), 1)
    slot = plot_w / n
    top = max(values, default=0) or 1
    y0 = top_pad + plot_h
    every = max(1, math.ceil(n / 16))  # keep tick labels from overlapping
    out = [_open(width, height, label)]
    _y_axis(out, top, left, width - right, y0, plot_h)
    for i, (name, value) in enumerate(zip(labels, values)):
        h = plot_h * value / top
        out.append(f'<rect x="{left + i * slot + slot * 0.12:.1f}" y="{y0 - h:.1f}" '
                   f'width="{slot * 0.76:.1f}" height="{h:.1f}" rx="2" fill="{colour}">'
                   f"<title>{escape(name)}: {fmt_int(value)}</title></rect>")
        if i % every == 0:
            out.append(f'<text x="{left + (i + 0.5) * slot:.1f}" y="{y0 + 15}" text-anchor="middle" '
                       f'class="tick">{escape(name)}</text>')
    return _close(out, left, width - right, y0, height, x_label)


def share_bar(share: float, colour: str = PALETTE[0], width: int = 90) -> str:
    """A tiny inline bar for a share in [0, 1], for table cells."""
    w = max(0.0, min(1.0, share)) * width
    return (f'<svg class="sharebar" viewBox="0 0 {width} 8" width="{width}" height="8" aria-hidden="true" '
            f'xmlns="http://www.w3.org/2000/svg"><rect width="{width}" height="8" rx="2" fill="{GRID}"/>'
            f'<rect width="{w:.1f}" height="8" rx="2" fill="{colour}"/></svg>')


def _close(out: list[str], left: float, right_edge: float, y0: float, height: int, x_label: str) -> str:
    """The x baseline, the x-axis title under it, and the end of the SVG."""
    out.append(f'<line x1="{left}" x2="{right_edge}" y1="{y0}" y2="{y0}" stroke="{INK}"/>')
    if x_label:
        out.append(f'<text x="{(left + right_edge) / 2:.1f}" y="{height - 6}" text-anchor="middle" class="lbl">'
                   f"{escape(x_label)}</text>")
    out.append("</svg>")
    return "".join(out)
