"""The HTML report: one self-contained page.

Inline CSS, the charts of `onnxshrink.report.charts` as base64 SVG `data:` images, no script,
nothing fetched from the network. Every user-controlled string (paths, node, output and layer
names) is escaped (`_e`).
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from onnxshrink.report import charts
from onnxshrink.report.model import figures, parity_seen_text
from onnxshrink.report.text import (
    HELD_OUT_HEADERS,
    LAYER_ERRORS_SHOWN,
    PEAK_NOTE,
    ROLE_TEXT,
    SUMMARY_ROWS,
    SYNTHETIC_WARNING,
    bench_cells,
    bench_headers,
    bench_inputs,
    bench_settings_text,
    error_sort_key,
    figure_text,
    format_bytes,
    headline_text,
    held_out_rows,
    held_out_text,
    kv_text,
    parity_cell,
    parity_columns,
    parity_rule_text,
    parity_status,
    parity_tolerance,
    quantization_lines,
    short_names,
    short_provider,
    summary_cell,
)

if TYPE_CHECKING:  # onnxshrink.bench is only read duck-typed, never imported at run time
    from onnxshrink.bench import BenchReport
    from onnxshrink.engine.optimize import OptimizeResult


_CSS = """
:root { --fg:#1f2328; --muted:#57606a; --line:#d8dee4; --bg:#f6f8fa; --ok:#1a7f37; --bad:#cf222e;
        --warn:#9a6700; --accent:#2f6fde; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 980px; margin: 0 auto; padding: 24px 28px 48px; }
header { border-bottom: 1px solid var(--line); padding-bottom: 16px; margin-bottom: 8px; }
h1 { font-size: 24px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 18px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 6px; }
p { margin: 6px 0; }
.muted { color: var(--muted); }
code, .cmd { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
.cmd { display: block; background: var(--bg); border: 1px solid var(--line); border-radius: 6px;
       padding: 8px 10px; white-space: pre-wrap; overflow-wrap: anywhere; margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 14px; }
.card { flex: 1 1 170px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
        background: var(--bg); }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; }
.card .detail { color: var(--muted); font-size: 12.5px; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.same td { color: var(--muted); }
td.name { overflow-wrap: anywhere; max-width: 520px; }
#bench-table td:first-child { min-width: 12em; }
#bench-table td:last-child { white-space: nowrap; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 2px 0 4px; font-size: 12.5px; }
.scroll { overflow-x: auto; }
.chart { margin: 12px 0; max-width: 100%; height: auto; display: block; }
ul.notes li { margin: 4px 0; }
details summary { cursor: pointer; color: var(--muted); margin: 6px 0; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; overflow-wrap: anywhere; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _e_path(value: Any) -> str:
    """Escaped, with line-break opportunities after each slash (long paths in narrow cells)."""
    return _e(value).replace("/", "/<wbr>")


def _svg_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _table(
    headers: Sequence[tuple[str, bool]],
    rows: Sequence[Sequence[str]],
    *,
    table_id: str,
    caption: str | None = None,
    row_classes: Sequence[str] | None = None,
    name_cols: Sequence[int] = (),
) -> str:
    """`headers`: (text, numeric). Cells are already-escaped HTML."""
    out = [f'<table id="{table_id}">']
    if caption:
        out.append(f"<caption>{caption}</caption>")
    out.append(
        "<thead><tr>"
        + "".join(f'<th class="n">{h}</th>' if num else f"<th>{h}</th>" for h, num in headers)
        + "</tr></thead><tbody>"
    )
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = []
        for j, (cell, (_, num)) in enumerate(zip(row, headers, strict=True)):
            klass = "n" if num else ("name" if j in name_cols else "")
            cells.append(f'<td class="{klass}">{cell}</td>' if klass else f"<td>{cell}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _img(svg: str | None, alt: str) -> str:
    if svg is None:
        return ""
    return f'<img class="chart" alt="{_e(alt)}" src="{_svg_uri(svg)}">'


def _bench_label(row: Mapping[str, Any], names: Mapping[str, str], single_provider: bool) -> str:
    model = names.get(str(row["model"]), str(row["model"]))
    role = ROLE_TEXT.get(str(row.get("role")))
    if role:  # original, lossless fp32, result: what the bars compare
        model = role
    if single_provider:
        return model
    return f"{model} \u00b7 {short_provider(str(row['provider']))}"


#: sensitivity bars: layers the stage changed, layers it kept as they were
_CHANGED_COLOR = "#2f6fde"
_KEPT_COLOR = "#c9503c"


def _sensitivity_chart(quant: Mapping[str, Any]) -> str | None:
    """Bars of the sensitivity ranking: output NSR with one layer quantized alone; the layers
    kept float in their own colour, the error budget as a dashed line, layer names without
    what they all share (`charts.distinct_labels`)."""
    sensitivity = quant["sensitivity"]
    kept = {str(k["name"]) for k in quant["kept_float"]}
    budget = quant["budget"]["max_error"]
    finite = [
        (str(e["layer"]), float(e["error"]))
        for e in sensitivity
        if isinstance(e["error"], (int, float)) and math.isfinite(e["error"])
    ]
    if not finite:
        return None
    top = sorted(finite, key=lambda item: -item[1])[:LAYER_ERRORS_SHOWN]
    values = [e for _, e in top]
    reference = None
    if isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0:
        reference = (float(budget), f"budget {budget:g}")
        values.append(float(budget))
    positive = [e for e in values if e > 0]
    shown, prefix, suffix = charts.distinct_labels([name for name, _ in top])
    kept_as = str(quant.get("kept_as") or "float")
    return charts.horizontal_bars(
        [name for name, _ in top],
        [
            charts.Series(
                "noise-to-signal",
                [e for _, e in top],
                _CHANGED_COLOR,
                colors=[_KEPT_COLOR if name in kept else _CHANGED_COLOR for name, _ in top],
            )
        ],
        title=f"Sensitivity: output error with one layer quantized alone (largest "
        f"{len(top)} of {len(sensitivity)})",
        axis_label="output noise-to-signal ratio",
        log=bool(positive) and max(positive) / min(positive) > 100,
        value_format="{:.2e}",
        legend=[(f"kept {kept_as}", _KEPT_COLOR), (str(quant["stage"]), _CHANGED_COLOR)],
        reference=reference,
        subtitle=charts.dropped_text(prefix, suffix),
        display=shown,
    )


def _shapes_subtitle(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """ "inputs x: 1x3x640x640" when every timed row ran on the same shapes; else None (the
    table's inputs column says each row's)."""
    same = bench_inputs(rows)
    return f"inputs {same}" if same else None


def render_html(
    result: OptimizeResult,
    *,
    command: str,
    model_path: str | os.PathLike[str] | None,
    output_path: str | os.PathLike[str] | None,
    bench: BenchReport | None = None,
    layer_errors: Sequence[tuple[str, float]] | None = None,
) -> str:
    """The report as one self-contained HTML page (inline CSS, SVG charts as data: images)."""
    d, name = figures(result, command, model_path, output_path, bench, layer_errors)
    before, after, change = (d["summary"][k] for k in ("before", "after", "change_pct"))
    parity = d["parity"]
    status, status_cls = parity_status(parity)
    body: list[str] = []

    # Header with the headline figures: the verdict is on the written model (for a lossy
    # result its held-out check and budget), the lossless stage's parity beside it.
    if not parity["checked"]:
        parity_detail = "--no-verify"
    elif not parity["verified"]:
        parity_detail = _e(parity.get("reason") or "")
    else:
        worst = d["headline"].get("max_rel_error") if d["quantization"] is None else None
        rel = [o.get("max_rel") for o in parity.get("outputs", [])]
        if worst is None:
            finite = [float(v) for v in rel if isinstance(v, (int, float))]
            worst = "inf" if any(v in ("inf", "nan") for v in rel) else max(finite, default=None)
        parity_detail = (
            f"max rel err {figure_text(worst, 'err')}, rtol {parity['rtol']:g}"
            if worst is not None
            else f"rtol {parity['rtol']:g}"
        )
    verdict_label, verdict, verdict_detail, verdict_cls = headline_text(d["headline"])

    def card(label: str, value: str, detail: str, cls: str = "") -> str:
        klass = f"value {cls}".strip()
        return (
            f'<div class="card"><div class="label">{label}</div>'
            f'<div class="{klass}">{value}</div><div class="detail">{detail}</div></div>'
        )

    def pct_text(key: str) -> str:
        p = change[key]
        return "n/a" if p is None else f"{p:+.1f}%"

    cards = [
        card(
            "nodes",
            pct_text("nodes"),
            f"{before['nodes']:,} \u2192 {after['nodes']:,}",
            "ok" if (change["nodes"] or 0) < 0 else "",
        ),
        card(
            "size",
            pct_text("bytes"),
            f"{format_bytes(before['bytes'])} \u2192 {format_bytes(after['bytes'])}",
            "ok" if (change["bytes"] or 0) < 0 else "",
        ),
        card(_e(verdict_label), _e(verdict), _e(verdict_detail), verdict_cls)
        if d["quantization"] is not None
        else card("parity", _e(status), parity_detail, status_cls),
        *(
            [card("lossless stage parity", _e(status), parity_detail, status_cls)]
            if d["quantization"] is not None
            else []
        ),
        card(
            "optimize time", f"{d['seconds']:.2f} s", f"{len(d['rules']['applied'])} rules applied"
        ),
    ]
    body.append("<header>")
    body.append(f"<h1>onnxshrink report: {_e(name)}</h1>")
    body.append(
        f'<p class="muted">{_e(d["generated"])} \u00b7 onnxshrink {_e(d["versions"]["onnxshrink"])}'
        + (f" \u00b7 output <code>{_e(d['output'])}</code>" if d["output"] else "")
        + "</p>"
    )
    body.append(f'<code class="cmd">$ {_e(command)}</code>')
    body.append('<div class="cards">' + "".join(cards) + "</div>")
    body.append("</header>")

    # Before / after.
    body.append('<section id="summary"><h2>Before and after</h2>')
    rows = []
    for key, label in SUMMARY_ROWS:
        rows.append(
            [
                _e(label),
                summary_cell(key, before[key]),
                summary_cell(key, after[key]),
                figure_text(change[key], "pct"),
            ]
        )
    body.append(
        _table(
            [("", False), ("before", True), ("after", True), ("change", True)],
            rows,
            table_id="before-after",
            caption="size is the serialized model (protobuf) in bytes, 1 KB = 1024 B",
        )
    )
    body.append("</section>")

    # Op histogram.
    body.append('<section id="ops"><h2>Op types</h2>')
    chart = charts.op_histogram_chart(result.before.ops, result.after.ops)
    body.append(
        _img(chart, "Bar chart: node count per op type before and after, for the ops that changed")
        if chart
        else '<p class="muted">No op-type count changed.</p>'
    )
    op_rows = d["ops"]
    body.append(
        _table(
            [("op", False), ("before", True), ("after", True), ("change", True)],
            [
                [
                    _e(r["op"]),
                    figure_text(r["before"]),
                    figure_text(r["after"]),
                    figure_text(r["change"], "delta"),
                ]
                for r in op_rows
            ],
            table_id="op-histogram",
            caption="all op types, the ones whose count changed first (subgraphs included)",
            row_classes=["same" if r["change"] == 0 else "" for r in op_rows],
            name_cols=(0,),
        )
    )
    body.append("</section>")

    # Rules.
    rules = d["rules"]
    body.append('<section id="rules"><h2>Rules</h2>')
    if rules["applied"]:
        body.append(
            _table(
                [("rule", False), ("times applied", True), ("seconds", True)],
                [
                    [_e(r["rule"]), figure_text(r["times"]), figure_text(r["seconds"], "s")]
                    for r in rules["applied"]
                ],
                table_id="rules-applied",
                caption="rules that changed the graph, most applications first; seconds include "
                "matching and checking",
            )
        )
    else:
        body.append('<p id="rules-applied">No rule changed the graph.</p>')
    if rules["ran_without_change"]:
        body.append(
            '<p class="muted">Ran without changing anything: '
            + ", ".join(_e(n) for n in rules["ran_without_change"])
            + "</p>"
        )
    body.append("<h3>Rules that declined</h3>")
    if rules["declined"]:
        body.append(
            _table(
                [("rule", False), ("reason", False), ("times", True)],
                [
                    [_e(r["rule"]), _e(r["reason"]), figure_text(r["times"])]
                    for r in rules["declined"]
                ],
                table_id="rules-declined",
                caption="a rule matched its pattern but a precondition did not hold",
                name_cols=(1,),
            )
        )
    else:
        body.append('<p class="muted">No rule declined a match.</p>')
    body.append("</section>")

    # Notes.
    if d["notes"]:
        body.append('<section id="notes"><h2>Notes</h2><ul class="notes">')
        body.extend(f"<li>{_e(n)}</li>" for n in d["notes"])
        body.append("</ul></section>")

    # Parity.
    stage = (
        f" (lossless stage, before {d['quantization']['stage']})"
        if d["quantization"] is not None
        else ""
    )
    body.append(f'<section id="parity"><h2>Parity with the original{stage}</h2>')
    if not parity["checked"]:
        body.append('<p class="warn">Parity was not checked (--no-verify).</p>')
    elif not parity["verified"]:
        body.append(f'<p class="warn">Parity could not be verified: {_e(parity["reason"])}</p>')
    else:
        atol = parity["atol"]
        body.append(
            f"<p>ONNX Runtime CPU, {parity_seen_text(parity)}. An output passes when "
            f"<code>{_e(parity_rule_text(parity))}</code> with rtol "
            f"{parity['rtol']:g}"
            + (f" and atol {atol:g}" if isinstance(atol, float) else "")
            + "; the relative error is <code>max|new \u2212 old| / max|old|</code>.</p>"
        )
        outputs = parity["outputs"]
        columns = parity_columns(outputs)
        own_tolerance = [parity_tolerance(o, parity) for o in outputs]
        headers = [("output", False), ("max abs err", True), ("max rel err", True)]
        headers += [(_e(title), True) for _, title, _ in columns]
        if any(own_tolerance):
            headers.append(("tolerance", False))
        headers.append(("result", False))
        prow = []
        for o, tol in zip(outputs, own_tolerance, strict=True):
            cells = [
                _e(o["name"]),
                figure_text(o["max_abs"], "err"),
                figure_text(o["max_rel"], "err"),
            ]
            cells += [parity_cell(o.get(key), kind) for key, _, kind in columns]
            if any(own_tolerance):
                cells.append(_e(tol or "default"))
            reason = f": {_e(o['reason'])}" if o.get("reason") else ""
            cells.append(
                '<span class="ok">ok</span>'
                if o["ok"]
                else f'<span class="bad">FAIL</span>{reason}'
            )
            prow.append(cells)
        body.append(_table(headers, prow, table_id="parity-table", name_cols=(0,)))
    body.append("</section>")

    # int8 quantization.
    quant = d["quantization"]
    if quant is not None:
        body.append(
            f'<section id="quantization"><h2>{_e(quant["stage"])} {_e(quant["family"])}</h2>'
        )
        if quant["synthetic"]:
            body.append(f'<p class="warn">{_e(SYNTHETIC_WARNING)}</p>')
        body.extend(f"<p>{_e(line)}</p>" for line in quantization_lines(quant))
        if quant["kept_float"]:
            body.append(
                _table(
                    [("layer", False), ("op", False), ("reason", False)],
                    [
                        [_e(k["name"]), _e(k["op"]), _e(k["reason"] or "")]
                        for k in quant["kept_float"]
                    ],
                    table_id="kept-float-table",
                    caption=f"layers kept {quant['kept_as']}, and why",
                    name_cols=(0, 2),
                )
            )
        if quant["sensitivity"]:
            body.append(
                _img(
                    _sensitivity_chart(quant),
                    "Bar chart: output noise-to-signal ratio with one layer quantized alone; "
                    f"layers kept {quant['kept_as']} in red, the error budget as a dashed line",
                )
            )
        check = quant["held_out_check"]
        if check is None:
            body.append(
                f'<p class="warn">The {_e(quant["stage"])} model was not checked (--no-verify).</p>'
            )
        elif not check["verified"]:
            body.append(
                f'<p class="warn">The {_e(quant["stage"])} model could not be checked: '
                f"{_e(check['reason'])}</p>"
            )
        else:
            cls = "" if check["held_out"] else ' class="warn"'
            body.append(f"<p{cls}>{_e(held_out_text(check, quant['stage']))}</p>")
            body.append(
                _table(
                    HELD_OUT_HEADERS,
                    held_out_rows(check, _e),
                    table_id="held-out-table",
                    caption="NSR = sum (result \u2212 fp32)\u00b2 / sum fp32\u00b2 of the worst "
                    "channel group, over all samples",
                    name_cols=(0,),
                )
            )
        body.append("</section>")

    # Benchmark.
    bench_d = d["bench"]
    if bench_d is not None:
        body.append('<section id="bench"><h2>Benchmark</h2>')
        brows = bench_d["rows"]
        providers = {r["provider"] for r in brows}
        single = len(providers) == 1
        if single and brows:
            body.append(
                f"<p>Provider: <b>{_e(short_provider(str(next(iter(providers)))))}</b>.</p>"
            )
        names = short_names([str(r["model"]) for r in brows])
        timed = [r for r in brows if isinstance(r["p50_ms"], (int, float))]
        if timed:
            svg = charts.latency_chart(
                [_bench_label(r, names, single) for r in timed],
                [float(r["p50_ms"]) for r in timed],
                [r["p90_ms"] if isinstance(r["p90_ms"], (int, float)) else None for r in timed],
                groups=None if single else [short_provider(str(r["provider"])) for r in timed],
                subtitle=_shapes_subtitle(timed),
            )
            body.append(_img(svg, "Bar chart: p50 latency per model and provider, whiskers to p90"))
        if brows:
            settings = bench_settings_text(bench_d["settings"])
            same_inputs = bench_inputs(brows)
            if same_inputs:
                body.append(f"<p>Inputs of every timing: <b>{_e(same_inputs)}</b>.</p>")
            body.append('<div class="scroll">')
            body.append(
                _table(
                    bench_headers(brows),
                    [
                        bench_cells(
                            r,
                            _e,
                            lambda m: (
                                f'<span title="{_e(m)}">{_e_path(names.get(str(m), m))}</span>'
                            ),
                            sep="<br>",
                            inputs=same_inputs is None,
                        )
                        for r in brows
                    ],
                    table_id="bench-table",
                    name_cols=(0,),
                )
            )
            body.append("</div>")
            body.append(
                '<p class="muted">'
                + (f"{_e(settings)}; " if settings else "")
                + "ratio: p50 against the first model on the same provider (below 1 is "
                "faster); placement: share of the nodes ORT ran on each provider; "
                + _e(PEAK_NOTE)
                + ".</p>"
            )
        else:
            body.append('<p class="warn">No benchmark ran.</p>')
        warnings = [
            (r["model"], r["provider"], w) for r in brows for w in (r.get("warnings") or [])
        ]
        if any(names.get(str(r["model"])) != str(r["model"]) for r in brows):
            body.append('<h3>Models</h3><dl class="kv">')
            body.extend(
                f"<dt>{_e(short)}</dt><dd><code>{_e(full)}</code></dd>"
                for full, short in names.items()
            )
            body.append("</dl>")
        if warnings:
            body.append('<h3>Warnings</h3><ul class="notes">')
            body.extend(
                f'<li class="warn"><b>{_e(m)}</b> on {_e(short_provider(str(p)))}: {_e(w)}</li>'
                for m, p, w in warnings
            )
            body.append("</ul>")
        if bench_d["skipped"]:
            body.append('<h3>Skipped</h3><ul class="notes">')
            body.extend(
                f"<li><b>{_e(s['what'])}</b>: {_e(s['reason'])}</li>" for s in bench_d["skipped"]
            )
            body.append("</ul>")
        environment = {k: v for k, v in bench_d["environment"].items() if v not in (None, "")}
        if environment:
            body.append('<h3>Benchmark environment</h3><dl class="kv">')
            body.extend(
                f"<dt>{_e(k)}</dt><dd>{_e(kv_text(v))}</dd>" for k, v in environment.items()
            )
            body.append("</dl>")
        body.append("</section>")

    # Per-layer error.
    if layer_errors is not None:
        body.append('<section id="layer-errors"><h2>Error per layer</h2>')
        errors_svg = charts.layer_error_chart(layer_errors, limit=LAYER_ERRORS_SHOWN)
        if errors_svg:
            body.append(_img(errors_svg, "Bar chart: relative error per layer, largest first"))
        top = sorted(
            d["layer_errors"],
            key=error_sort_key,
        )[:LAYER_ERRORS_SHOWN]
        if top:
            # The chart shows the same figures; the table is there for full names and copying.
            body.append(
                f"<details><summary>the {len(top)} largest of {len(layer_errors)} as a table"
                "</summary>"
            )
            body.append(
                _table(
                    [("layer", False), ("relative error", True)],
                    [[_e(r["layer"]), figure_text(r["rel_error"], "err")] for r in top],
                    table_id="layer-error-table",
                    name_cols=(0,),
                )
            )
            body.append("</details>")
        else:
            body.append('<p class="muted">No per-layer figures.</p>')
        body.append("</section>")

    # Environment.
    body.append('<section id="environment"><h2>Environment</h2><dl class="kv">')
    body.append(f"<dt>date</dt><dd>{_e(d['generated'])}</dd>")
    if d["model"]:
        body.append(f"<dt>model</dt><dd><code>{_e(d['model'])}</code></dd>")
    body.append(
        "<dt>output</dt><dd>"
        + (f"<code>{_e(d['output'])}</code>" if d["output"] else "(not written)")
        + "</dd>"
    )
    body.extend(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in d["versions"].items())
    body.append("</dl></section>")
    body.append(
        "<footer>Generated by onnxshrink. Self-contained: no scripts, no network; charts are "
        "embedded SVG.</footer>"
    )

    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>onnxshrink report: {_e(name)}</title>"
        f"<style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )
