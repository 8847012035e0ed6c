"""Small SVG charts for the optimization report, drawn by hand (no plotting library).

Every chart is a horizontal bar chart, about 720 px wide, returned as an SVG document string
that `report` embeds as a base64 `data:` image, so the HTML stays one self-contained file:

1. `op_histogram_chart`: op-type counts before and after, two bars per op.
2. `latency_chart`: p50 latency per model and provider, with a whisker to p90.
3. `layer_error_chart`: relative error per layer, largest first, on a log axis when the
   values span more than two decades.

Layer names (`distinct_labels`) lose the part every label shares first: the common leading path
components (`/inner/encoder/`), then, if still too long, the common trailing ones; the chart's
title says what was dropped. Labels still wider than the label column are cut in the middle
with an ellipsis; the full text stays in a `<title>`
(a tooltip when the SVG is opened on its own; an `<img>` shows no tooltips, so the report also
prints the full names in a table). Text widths are estimated from character counts (no font
metrics here), with a margin that covers DejaVu Sans and the usual system sans fonts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 720
_FONT = "system-ui, -apple-system, 'Segoe UI', 'DejaVu Sans', Arial, sans-serif"
_FONT_SIZE = 12
# Advance of a 12 px sans glyph, on the wide side: op names are capital-heavy (DejaVu Sans,
# Chromium's usual fallback on Linux, averages ~7.5 px on "BatchNormalization").
_CHAR_W = 7.6
_LABEL_MAX_CHARS = 36
_TEXT = "#1f2328"
_MUTED = "#57606a"
_GRID = "#d8dee4"
# Before/after and a few series colours, distinguishable for the common colour-vision deficiencies.
BEFORE = "#9aa4b1"
AFTER = "#2f6fde"
SERIES = ("#2f6fde", "#e5832b", "#2a9d5c", "#b04fc4", "#c9503c", "#6b7785")


@dataclass
class Series:
    """One set of bars: a legend name, one value per category (None: no bar), a colour."""

    name: str
    values: Sequence[float | None]
    color: str
    colors: Sequence[str] | None = None  # per-bar colours, overriding `color`


def _fmt(value: float, unit: str = "") -> str:
    if value == 0:
        text = "0"
    elif abs(value) >= 1000 or abs(value) < 0.01:
        text = f"{value:.2e}" if not float(value).is_integer() else f"{value:,.0f}"
    elif float(value).is_integer():
        text = f"{value:.0f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def _truncate(text: str, max_chars: int) -> str:
    """Cut the middle: names that share a long prefix (layer paths) differ at the end."""
    if len(text) <= max_chars:
        return text
    head = (max_chars - 1) // 2
    tail = max_chars - 1 - head
    return text[:head] + "\u2026" + text[len(text) - tail :]


def _split_path(text: str) -> list[str]:
    """'/a/b.3/c' -> ['/', 'a/', 'b.3/', 'c']: components keeping their separator."""
    parts: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch == "/":
            parts.append(text[start : i + 1])
            start = i + 1
    if start < len(text):
        parts.append(text[start:])
    return parts


def distinct_labels(
    labels: Sequence[str], max_chars: int = _LABEL_MAX_CHARS
) -> tuple[list[str], str, str]:
    """Labels without what all of them share: (shown labels, dropped prefix, dropped suffix).

    The common leading `/`-separated components go first (`/inner/encoder/layer.3/output/dense/
    MatMul` and `.../layer.4/...` keep `layer.3/output/dense/MatMul`); the common trailing
    components only while a label is still longer than `max_chars`. A label is never left empty,
    and a single label keeps its name. Labels still too long are left for `_truncate`.
    """
    names = list(labels)
    if len(set(names)) < 2:
        return names, "", ""
    split = [_split_path(n) for n in names]
    shortest = min(len(p) for p in split)
    lead = 0
    # at most shortest - 1 components: every label keeps at least one of its own
    while lead < shortest - 1 and all(p[lead] == split[0][lead] for p in split):
        lead += 1
    prefix = "".join(split[0][:lead])
    split = [p[lead:] for p in split]
    trail = 0
    if any(len("".join(p)) > max_chars for p in split):
        shortest = min(len(p) for p in split)
        while trail < shortest - 1 and all(p[-1 - trail] == split[0][-1 - trail] for p in split):
            trail += 1
    suffix = "".join(split[0][len(split[0]) - trail :]) if trail else ""
    if suffix and not suffix.startswith("/"):  # the separator before it goes too
        suffix = "/" + suffix
    shown = ["".join(p[: len(p) - trail]) for p in split]
    if suffix:  # the cut falls after a separator: keep it off the label's end
        shown = [t.rstrip("/") or t for t in shown]
    if len(set(shown)) < len(set(names)):  # never merge two labels
        return names, "", ""
    return shown, prefix, suffix


def dropped_text(prefix: str, suffix: str) -> str | None:
    """The chart subtitle naming what `distinct_labels` left out of every label; None if nothing."""
    if not prefix and not suffix:
        return None
    return "names shown without " + " and ".join(
        part
        for part in (
            f"the common prefix {prefix}" if prefix else "",
            f"the common suffix {suffix}" if suffix else "",
        )
        if part
    )


def _text_width(text: str, size: float = _FONT_SIZE) -> float:
    return len(text) * _CHAR_W * size / _FONT_SIZE


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Tick values 0, step, 2*step, ... covering [0, high], step in {1, 2, 2.5, 5} x 10^k."""
    if not high > 0 or not math.isfinite(high):
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    n = math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(n + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    lo = math.floor(math.log10(low))
    hi = math.ceil(math.log10(high))
    return [10.0**k for k in range(lo, max(hi, lo + 1) + 1)]


def horizontal_bars(
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    title: str,
    unit: str = "",
    axis_label: str | None = None,
    whiskers: Sequence[float | None] | None = None,
    log: bool = False,
    value_format: str | None = None,
    legend: Sequence[tuple[str, str]] | None = None,
    value_labels: Sequence[str] | None = None,
    reference: tuple[float, str] | None = None,
    subtitle: str | None = None,
    display: Sequence[str] | None = None,
) -> str:
    """An SVG of grouped horizontal bars, one group per label, one bar per series.

    `reference` (value, text) draws a dashed vertical line across the bars at that value, named
    at its top (e.g. an error budget); the axis reaches it. `subtitle` is a muted line under
    the title (e.g. the part of the labels left out). `display` (one per label) is the text
    shown for each label (e.g. from `distinct_labels`); the full label stays as its tooltip.

    `whiskers` (one per label, first series only) draws a line from the bar's end to that value
    with a cap (e.g. p50 bar, p90 whisker). `log` uses a base-10 axis; non-positive values then
    get no bar and their label says so. `value_format` (e.g. "{:.2e}") formats the value printed
    after each bar; default: 3 significant digits, then `unit`. `axis_label` names the axis
    under its tick values (default: `unit`; log axes add "log scale"). `legend` ((name, colour) pairs) replaces
    the default legend, which names the series when there are several. `value_labels` (one per
    label, first series only) replaces the printed value, e.g. "p50 1.2 · p90 1.5 ms".
    """
    if legend is None and len(series) > 1:
        legend = [(s.name, s.color) for s in series]
    n_series = max(len(series), 1)
    bar_h = 16 if n_series == 1 else 11
    group_gap = 10
    group_h = bar_h * n_series + group_gap
    shown = [_truncate(label, _LABEL_MAX_CHARS) for label in display or labels]
    label_w = max((_text_width(s) for s in shown), default=40) + 14
    legend_h = 24 if legend else 0
    subtitle_h = 18 if subtitle else 0
    reference_h = 16 if reference is not None else 0
    top = 30 + subtitle_h + legend_h + reference_h
    axis_name = axis_label if axis_label is not None else unit
    axis_h = 26 + (16 if axis_name or log else 0)
    height = int(top + group_h * len(labels) + axis_h + 6)

    def fmt(value: float) -> str:
        return value_format.format(value) if value_format else _fmt(value, unit)

    values = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    values += [w for w in (whiskers or []) if w is not None and math.isfinite(w)]
    if reference is not None and math.isfinite(reference[0]):
        values.append(reference[0])
    positive = [v for v in values if v > 0]
    # Room for the longest value label after the bars.
    longest = max((_text_width(fmt(v)) for v in values), default=30)
    longest = max([longest, *(_text_width(t, 11) for t in value_labels or [])])
    plot_x0 = label_w
    plot_x1 = WIDTH - max(longest + 16, 48)
    plot_w = plot_x1 - plot_x0

    if log and positive:
        ticks = _log_ticks(min(positive), max(positive))
        lo, hi = math.log10(ticks[0]), math.log10(ticks[-1])

        def x_of(v: float) -> float:
            if v <= 0:
                return plot_x0
            return plot_x0 + (math.log10(v) - lo) / (hi - lo) * plot_w

        tick_text = [f"1e{round(math.log10(t))}" for t in ticks]
    else:
        log = False
        ticks = nice_ticks(max(values, default=1.0))
        top_value = ticks[-1] or 1.0

        def x_of(v: float) -> float:
            return plot_x0 + max(v, 0.0) / top_value * plot_w

        tick_text = [_fmt(t) for t in ticks]

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="{escape(_FONT)}" '
        f'font-size="{_FONT_SIZE}" role="img">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="0" y="17" font-size="14" font-weight="600" fill="{_TEXT}">{escape(title)}</text>',
    ]
    if subtitle:
        parts.append(
            f'<text x="0" y="{30 + 10:.1f}" font-size="11" fill="{_MUTED}">{escape(subtitle)}</text>'
        )
    x = 0.0
    ly = 30 + subtitle_h
    for name, color in legend or []:
        parts.append(f'<rect x="{x:.1f}" y="{ly}" width="12" height="12" rx="2" fill="{color}"/>')
        parts.append(f'<text x="{x + 17:.1f}" y="{ly + 10}" fill="{_TEXT}">{escape(name)}</text>')
        x += 17 + _text_width(name) + 22
    plot_y0 = top - 4
    plot_y1 = top + group_h * len(labels) - group_gap + 4
    # Grid lines and tick labels.
    for t, text in zip(ticks, tick_text, strict=True):
        x = x_of(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{plot_y0:.1f}" x2="{x:.1f}" y2="{plot_y1:.1f}" '
            f'stroke="{_GRID}" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{plot_y1 + 16:.1f}" text-anchor="middle" '
            f'fill="{_MUTED}" font-size="11">{escape(text)}</text>'
        )
    parts.append(
        f'<line x1="{plot_x0:.1f}" y1="{plot_y0:.1f}" x2="{plot_x0:.1f}" y2="{plot_y1:.1f}" '
        f'stroke="{_MUTED}" stroke-width="1"/>'
    )
    on_top: list[str] = []  # drawn after the bars
    if reference is not None and math.isfinite(reference[0]) and not (log and reference[0] <= 0):
        rx = x_of(reference[0])
        on_top.append(
            f'<line class="reference" x1="{rx:.1f}" y1="{plot_y0 - reference_h + 4:.1f}" '
            f'x2="{rx:.1f}" y2="{plot_y1:.1f}" stroke="{_TEXT}" stroke-width="1.5" '
            f'stroke-dasharray="5,3"/>'
        )
        anchor = "end" if rx > plot_x0 + plot_w / 2 else "start"
        shift = -4 if anchor == "end" else 4
        on_top.append(
            f'<text x="{rx + shift:.1f}" y="{plot_y0 - reference_h + 12:.1f}" '
            f'text-anchor="{anchor}" font-size="11" fill="{_TEXT}">{escape(reference[1])}</text>'
        )
    if log:
        axis_name = f"{axis_name} (log scale)".strip()
    if axis_name:
        parts.append(
            f'<text x="{plot_x1:.1f}" y="{plot_y1 + 32:.1f}" text-anchor="end" fill="{_MUTED}" '
            f'font-size="11">{escape(axis_name)}</text>'
        )

    for i, (label, short) in enumerate(zip(labels, shown, strict=True)):
        y = top + i * group_h
        center = y + bar_h * n_series / 2
        parts.append(
            f'<text x="{label_w - 8:.1f}" y="{center + 4:.1f}" text-anchor="end" '
            f'fill="{_TEXT}"><title>{escape(label)}</title>{escape(short)}</text>'
        )
        for j, s in enumerate(series):
            value = s.values[i] if i < len(s.values) else None
            by = y + j * bar_h
            if value is None:
                continue
            if not math.isfinite(value):
                parts.append(
                    f'<text x="{plot_x0 + 4:.1f}" y="{by + bar_h - 3:.1f}" '
                    f'fill="{_MUTED}">{escape(str(value))}</text>'
                )
                continue
            x1 = x_of(value)
            color = s.colors[i] if s.colors is not None and i < len(s.colors) else s.color
            w = max(x1 - plot_x0, 0.0)
            if w > 0:
                parts.append(
                    f'<rect x="{plot_x0:.1f}" y="{by + 1:.1f}" width="{w:.1f}" '
                    f'height="{bar_h - 2}" rx="2" fill="{color}">'
                    f"<title>{escape(label)}: {escape(s.name)} {escape(fmt(value))}</title></rect>"
                )
            end = x1
            whisker = whiskers[i] if whiskers is not None and j == 0 and i < len(whiskers) else None
            if whisker is not None and math.isfinite(whisker) and whisker > value:
                wx = x_of(whisker)
                mid = by + bar_h / 2
                parts.append(
                    f'<line x1="{x1:.1f}" y1="{mid:.1f}" x2="{wx:.1f}" y2="{mid:.1f}" '
                    f'stroke="{_TEXT}" stroke-width="1.5"/>'
                )
                parts.append(
                    f'<line x1="{wx:.1f}" y1="{by + 2:.1f}" x2="{wx:.1f}" y2="{by + bar_h - 2:.1f}" '
                    f'stroke="{_TEXT}" stroke-width="1.5"/>'
                )
                end = wx
            text = fmt(value) if not (log and value <= 0) else f"{fmt(value)} (not on log axis)"
            if value_labels is not None and j == 0 and i < len(value_labels):
                text = value_labels[i]
            parts.append(
                f'<text x="{end + 5:.1f}" y="{by + bar_h - 3:.1f}" fill="{_TEXT}" '
                f'font-size="11">{escape(text)}</text>'
            )
    parts.extend(on_top)
    parts.append("</svg>")
    return "\n".join(parts)


def op_histogram_chart(
    before: Mapping[str, int], after: Mapping[str, int], *, limit: int = 30
) -> str | None:
    """Op counts before and after for the ops whose count changed, largest change first.

    At most `limit` ops (the title says how many were left out); None when no count changed.
    """
    changed = [op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0)]
    if not changed:
        return None
    changed.sort(key=lambda op: (-abs(after.get(op, 0) - before.get(op, 0)), op))
    title = "Op types whose count changed"
    if len(changed) > limit:
        title += f" (largest {limit} of {len(changed)} changes)"
        changed = changed[:limit]
    return horizontal_bars(
        changed,
        [
            Series("before", [before.get(op, 0) for op in changed], BEFORE),
            Series("after", [after.get(op, 0) for op in changed], AFTER),
        ],
        title=title,
        axis_label="nodes",
    )


def latency_chart(
    labels: Sequence[str],
    p50_ms: Sequence[float],
    p90_ms: Sequence[float | None],
    groups: Sequence[str] | None = None,
    subtitle: str | None = None,
) -> str:
    """p50 latency bars with a whisker to p90, one per label (e.g. "model · provider").

    `groups` (one per label, e.g. the provider) colours the bars, with a legend when there are
    several; `subtitle` (e.g. the input shapes the timings ran on) goes under the title.
    """
    groups = list(groups) if groups is not None else ["p50"] * len(labels)
    names = list(dict.fromkeys(groups))
    colors = {g: SERIES[i % len(SERIES)] for i, g in enumerate(names)}
    return horizontal_bars(
        labels,
        [Series("p50", list(p50_ms), SERIES[0], colors=[colors[g] for g in groups])],
        title="Latency: p50 bar, whisker to p90",
        unit="ms",
        value_format="{:.2f} ms",
        value_labels=[
            f"p50 {p50:.2f}" + (f" \u00b7 p90 {p90:.2f}" if p90 is not None else "") + " ms"
            for p50, p90 in zip(p50_ms, p90_ms, strict=True)
        ],
        whiskers=p90_ms,
        legend=list(colors.items()) if len(names) > 1 else None,
        subtitle=subtitle,
    )


def layer_error_chart(errors: Sequence[tuple[str, float]], *, limit: int = 20) -> str | None:
    """The `limit` largest relative errors per layer; log axis when they span > 2 decades."""
    finite = [(name, float(e)) for name, e in errors if e is not None and math.isfinite(float(e))]
    if not finite:
        return None
    top = sorted(finite, key=lambda item: -item[1])[:limit]
    positive = [e for _, e in top if e > 0]
    log = bool(positive) and max(positive) / min(positive) > 100
    title = f"Relative error per layer (largest {len(top)} of {len(errors)})"
    shown, prefix, suffix = distinct_labels([name for name, _ in top])
    return horizontal_bars(
        [name for name, _ in top],
        [Series("relative error", [e for _, e in top], "#c9503c")],
        display=shown,
        subtitle=dropped_text(prefix, suffix),
        title=title,
        axis_label="relative error",
        log=log,
        value_format="{:.2e}",
    )
