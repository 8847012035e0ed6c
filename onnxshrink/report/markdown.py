"""The markdown report: the HTML report's tables as GitHub-flavoured markdown.

No charts: GitHub does not show `data:` images; a line says so. User-controlled strings are
escaped for inline markdown and GFM tables (`_md`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from onnxshrink.report.model import figures, parity_seen_text
from onnxshrink.report.text import (
    HELD_OUT_HEADERS,
    LAYER_ERRORS_SHOWN,
    PEAK_NOTE,
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
    short_provider,
    summary_cell,
)

if TYPE_CHECKING:  # onnxshrink.bench is only read duck-typed, never imported at run time
    from onnxshrink.bench import BenchReport
    from onnxshrink.engine.optimize import OptimizeResult


def _md(value: Any) -> str:
    """Inline markdown text: `<` and `>` as entities (renderers pass raw HTML through), except
    inside `code spans`, which show entities literally and never render HTML; pipes escaped
    (GFM tables); newlines as spaces."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    pieces = text.split("`")
    if len(pieces) % 2 == 0:  # an unpaired backtick: no code spans
        pieces = [text]
    for i in range(0, len(pieces), 2):  # the even pieces are outside code spans
        pieces[i] = pieces[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces).replace("|", "\\|")


def _md_table(headers: Sequence[tuple[str, bool]], rows: Sequence[Sequence[str]]) -> str:
    head = "| " + " | ".join(h for h, _ in headers) + " |"
    sep = "|" + "|".join("---:" if num else "---" for _, num in headers) + "|"
    lines = [head, sep]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def render_markdown(
    result: OptimizeResult,
    *,
    command: str,
    model_path: str | os.PathLike[str] | None,
    output_path: str | os.PathLike[str] | None,
    bench: BenchReport | None = None,
    layer_errors: Sequence[tuple[str, float]] | None = None,
) -> str:
    """The report as GitHub-flavoured markdown: the HTML report's tables, without charts."""
    d, name = figures(result, command, model_path, output_path, bench, layer_errors)
    before, after, change = (d["summary"][k] for k in ("before", "after", "change_pct"))
    parity = d["parity"]
    status, _ = parity_status(parity)
    out: list[str] = [f"# onnxshrink report: {_md(name)}", ""]
    fence = "````" if "```" in command else "```"
    out += [fence, f"$ {command}", fence, ""]

    def pct(key: str) -> str:
        return "n/a" if change[key] is None else f"{change[key]:+.1f}%"

    verdict_label, verdict, verdict_detail, _ = headline_text(d["headline"])
    verdict_text = f"**{_md(verdict_label)}** {_md(verdict)}" + (
        f" ({_md(verdict_detail)})" if verdict_detail else ""
    )
    if d["quantization"] is not None:  # the verdict is the lossy model's; parity the lossless'
        verdict_text += f" \u00b7 **lossless stage parity** {status}"
    out.append(
        f"**nodes** {before['nodes']:,} \u2192 {after['nodes']:,} ({pct('nodes')}) \u00b7 "
        f"**size** {format_bytes(before['bytes'])} \u2192 {format_bytes(after['bytes'])} "
        f"({pct('bytes')}) \u00b7 {verdict_text} \u00b7 **time** {d['seconds']:.2f} s"
    )
    out += [
        "",
        f"Generated {d['generated']}. Charts are in the HTML report (`--report out.html`); "
        "this file holds the same figures as tables.",
        "",
        "## Before and after",
        "",
    ]
    out.append(
        _md_table(
            [("", False), ("before", True), ("after", True), ("change", True)],
            [
                [
                    label,
                    summary_cell(key, before[key]),
                    summary_cell(key, after[key]),
                    figure_text(change[key], "pct"),
                ]
                for key, label in SUMMARY_ROWS
            ],
        )
    )
    out += ["", "## Op types", "", "All op types, the ones whose count changed first.", ""]
    out.append(
        _md_table(
            [("op", False), ("before", True), ("after", True), ("change", True)],
            [
                [
                    _md(r["op"]),
                    figure_text(r["before"]),
                    figure_text(r["after"]),
                    figure_text(r["change"], "delta"),
                ]
                for r in d["ops"]
            ],
        )
    )
    rules = d["rules"]
    out += ["", "## Rules applied", ""]
    if rules["applied"]:
        out.append(
            _md_table(
                [("rule", False), ("times", True), ("seconds", True)],
                [
                    [_md(r["rule"]), figure_text(r["times"]), figure_text(r["seconds"], "s")]
                    for r in rules["applied"]
                ],
            )
        )
    else:
        out.append("No rule changed the graph.")
    if rules["ran_without_change"]:
        out += [
            "",
            "Ran without changing anything: " + ", ".join(map(_md, rules["ran_without_change"])),
        ]
    out += ["", "## Rules that declined", ""]
    if rules["declined"]:
        out.append(
            _md_table(
                [("rule", False), ("reason", False), ("times", True)],
                [
                    [_md(r["rule"]), _md(r["reason"]), figure_text(r["times"])]
                    for r in rules["declined"]
                ],
            )
        )
    else:
        out.append("No rule declined a match.")
    if d["notes"]:
        out += ["", "## Notes", ""]
        out += [f"- {_md(n)}" for n in d["notes"]]
    stage = (
        f" (lossless stage, before {d['quantization']['stage']})"
        if d["quantization"] is not None
        else ""
    )
    out += ["", f"## Parity with the original{stage}", ""]
    if not parity["checked"]:
        out.append("Parity was not checked (--no-verify).")
    elif not parity["verified"]:
        out.append(f"Parity could not be verified: {_md(parity['reason'])}")
    else:
        atol = parity["atol"]
        out.append(
            f"ONNX Runtime CPU, {parity_seen_text(parity)}, rtol {parity['rtol']:g}"
            + (f", atol {atol:g}" if isinstance(atol, float) else "")
            + f". An output passes when `{parity_rule_text(parity)}`."
        )
        out.append("")
        outputs = parity["outputs"]
        columns = parity_columns(outputs)
        own_tolerance = [parity_tolerance(o, parity) for o in outputs]
        headers = [("output", False), ("max abs err", True), ("max rel err", True)]
        headers += [(title, True) for _, title, _ in columns]
        if any(own_tolerance):
            headers.append(("tolerance", False))
        headers.append(("result", False))
        rows = []
        for o, tol in zip(outputs, own_tolerance, strict=True):
            cells = [
                _md(o["name"]),
                figure_text(o["max_abs"], "err"),
                figure_text(o["max_rel"], "err"),
            ]
            cells += [parity_cell(o.get(key), kind) for key, _, kind in columns]
            if any(own_tolerance):
                cells.append(_md(tol or "default"))
            reason = f": {_md(o['reason'])}" if o.get("reason") else ""
            cells.append("ok" if o["ok"] else f"**FAIL**{reason}")
            rows.append(cells)
        out.append(_md_table(headers, rows))
    quant = d["quantization"]
    if quant is not None:
        out += ["", f"## {quant['stage']} {quant['family']}", ""]
        if quant["synthetic"]:
            out += [f"**Warning:** {_md(SYNTHETIC_WARNING)}", ""]
        for line in quantization_lines(quant):
            out += [_md(line), ""]
        if quant["kept_float"]:
            out += [f"Layers kept {quant['kept_as']}, and why:", ""]
            out.append(
                _md_table(
                    [("layer", False), ("op", False), ("reason", False)],
                    [
                        [_md(k["name"]), _md(k["op"]), _md(k["reason"] or "")]
                        for k in quant["kept_float"]
                    ],
                )
            )
            out.append("")
        if quant["sensitivity"]:
            top = quant["sensitivity"][:LAYER_ERRORS_SHOWN]  # ranked, largest first
            out += [
                f"Sensitivity (output NSR with one layer quantized alone), the {len(top)} "
                f"largest of {len(quant['sensitivity'])}:",
                "",
            ]
            out.append(
                _md_table(
                    [("layer", False), ("op", False), ("NSR alone", True)],
                    [[_md(e["layer"]), _md(e["op"]), figure_text(e["error"], "err")] for e in top],
                )
            )
            out.append("")
        check = quant["held_out_check"]
        if check is None:
            out.append(f"The {quant['stage']} model was not checked (--no-verify).")
        elif not check["verified"]:
            out.append(f"The {quant['stage']} model could not be checked: {_md(check['reason'])}")
        else:
            out += [_md(held_out_text(check, quant["stage"])), ""]
            out.append(_md_table(HELD_OUT_HEADERS, held_out_rows(check, _md)))
    bench_d = d["bench"]
    if bench_d is not None:
        out += ["", "## Benchmark", ""]
        if bench_d["rows"]:
            brows = bench_d["rows"]
            same_inputs = bench_inputs(brows)
            if same_inputs:
                out += [f"Inputs of every timing: **{_md(same_inputs)}**.", ""]
            out.append(
                _md_table(
                    bench_headers(brows),
                    [bench_cells(r, _md, inputs=same_inputs is None) for r in brows],
                )
            )
            settings = bench_settings_text(bench_d["settings"])
            out += [
                "",
                (f"{settings}; " if settings else "")
                + "ratio: p50 against the first model on the same provider (below 1 is "
                "faster); placement: share of the nodes ORT ran on each provider; "
                f"{_md(PEAK_NOTE)}.",
            ]
            warnings = [
                (r["model"], r["provider"], w)
                for r in bench_d["rows"]
                for w in (r.get("warnings") or [])
            ]
            if warnings:
                out += ["", "Warnings:", ""]
                out += [
                    f"- **{_md(m)}** on {_md(short_provider(str(p)))}: {_md(w)}"
                    for m, p, w in warnings
                ]
        else:
            out.append("No benchmark ran.")
        if bench_d["skipped"]:
            out += ["", "Skipped:", ""]
            out += [f"- **{_md(s['what'])}**: {_md(s['reason'])}" for s in bench_d["skipped"]]
        if bench_d["environment"]:
            out += [
                "",
                "Environment: "
                + "; ".join(
                    f"{_md(k)} {_md(kv_text(v))}"
                    for k, v in bench_d["environment"].items()
                    if v not in (None, "")
                ),
            ]
    if layer_errors is not None:
        out += ["", "## Error per layer", ""]
        top = sorted(
            d["layer_errors"],
            key=error_sort_key,
        )[:LAYER_ERRORS_SHOWN]
        if top:
            out.append(f"The {len(top)} largest of {len(layer_errors)}.")
            out.append("")
            out.append(
                _md_table(
                    [("layer", False), ("relative error", True)],
                    [[_md(r["layer"]), figure_text(r["rel_error"], "err")] for r in top],
                )
            )
        else:
            out.append("No per-layer figures.")
    out += ["", "## Environment", ""]
    env_rows = [["date", _md(d["generated"])]]
    if d["model"]:
        env_rows.append(["model", _md(d["model"])])
    env_rows.append(["output", _md(d["output"]) if d["output"] else "(not written)"])
    env_rows += [[_md(k), _md(v)] for k, v in d["versions"].items()]
    out.append(_md_table([("item", False), ("value", False)], env_rows))
    return "\n".join(out) + "\n"
