"""The report's figures as text, shared by the HTML and markdown renderers.

Numbers as table cells (`figure_text`, `format_bytes`, `parity_cell`), provider names and
placement shares, the parity rule in words, the benchmark table's rows, the sentences of the
lossy-stage section. The strings are plain text: each renderer escapes them for its format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: how many layers the per-layer error and sensitivity tables and charts show
LAYER_ERRORS_SHOWN = 20

#: the before/after table's rows: summary key, label
SUMMARY_ROWS = (
    ("nodes", "nodes"),
    ("nodes_total", "nodes incl. subgraphs"),
    ("initializers", "initializers"),
    ("parameters", "parameters"),
    ("bytes", "size"),
)


def format_bytes(n: float) -> str:
    """Sizes the way the CLI prints them (1024-based, one decimal)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def figure_text(value: Any, kind: str = "int") -> str:
    """A figure as table text; `kind` is err, pct, delta, s, ms, float, ratio or int.

    None is a dash, strings ("inf", "nan" from the JSON-safe data) pass through, booleans are
    yes/no.
    """
    if value is None:
        return "\u2013"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "err":
        return f"{value:.2e}"
    if kind == "pct":
        return f"{value:+.1f}%"
    if kind == "delta":
        return f"{value:+,d}" if value else "0"
    if kind == "s":
        return f"{value:.3f}"
    if kind == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:.1f}"
    if kind == "float":
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if kind == "ratio":
        return f"{value:.3f}"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    return f"{int(value):,d}"


def shapes_text(shapes: Mapping[str, Sequence[int]] | None) -> str:
    """Input shapes in words: "x: 1x3x640x640"; inputs of one shape share it ("input_ids,
    attention_mask: 4x21"); "" when unknown. Says what a timing ran on."""
    if not shapes:
        return ""
    groups: dict[str, list[str]] = {}
    for name, dims in shapes.items():
        text = "x".join(str(int(d)) for d in dims) if len(dims) else "scalar"
        groups.setdefault(text, []).append(str(name))
    return "; ".join(f"{', '.join(names)}: {dims}" for dims, names in groups.items())


def headline_text(h: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """The headline verdict on the written model (`model.headline`) as (label, value, detail,
    css class): for a lossy result its held-out check and budget, else the parity check."""
    status = str(h["status"])
    cls = {True: "ok", False: "bad"}.get(h["ok"], "warn")
    if h["model"] == "lossless":
        detail = (
            f"max rel err {figure_text(h['max_rel_error'], 'err')}, rtol {h['rtol']:g}"
            if h["ok"] is not None
            else ""
        )
        return "parity", status, detail, cls
    label = f"{h['stage']} vs original"
    if h["error"] is None:
        return label, status, str(h.get("reason") or ""), cls
    where = "held-out" if h["held_out"] else "NOT held-out"
    detail = (
        f"NSR {figure_text(h['error'], 'float')} on {h['samples']} {where} run(s), budget "
        f"{figure_text(h['budget'], 'float')}"
        + (
            f"; min cosine {parity_cell(h['min_cosine'], 'cos')}"
            if h["min_cosine"] is not None
            else ""
        )
        + (f"; {h['metric']} {figure_text(h['metric_value'], 'float')}" if h.get("metric") else "")
    )
    if not h["held_out"] and cls == "ok":
        cls = "warn"
    return label, status, detail, cls


def summary_cell(key: str, value: int) -> str:
    """A before/after figure: sizes as KB/MB, counts with thousands separators."""
    return format_bytes(value) if key == "bytes" else f"{value:,d}"


_PROVIDER_NAMES = {
    "CPUExecutionProvider": "CPU",
    "CUDAExecutionProvider": "CUDA",
    "TensorrtExecutionProvider": "TensorRT",
    "cpu": "CPU",
    "cuda": "CUDA",
    "tensorrt": "TensorRT",
}


def short_provider(name: str) -> str:
    """CPU, CUDA, TensorRT for ORT's provider names and the CLI's; others without the suffix."""
    if name in _PROVIDER_NAMES:
        return _PROVIDER_NAMES[name]
    return name[: -len("ExecutionProvider")] if name.endswith("ExecutionProvider") else name


def _placement_parts(placement: Any) -> list[str]:
    """['CUDA 93%', 'CPU 7%'], largest share first; shares may be fractions (sum ~1) or
    percents."""
    if not placement:
        return []
    items = {str(k): float(v) for k, v in dict(placement).items() if v is not None}
    scale = 1.0 if sum(items.values()) > 1.5 else 100.0
    ordered = sorted(items.items(), key=lambda kv: -kv[1])
    return [f"{short_provider(k)} {v * scale:.0f}%" for k, v in ordered]


def short_names(paths: Sequence[str]) -> dict[str, str]:
    """Each path's shortest tail of components that still tells it apart from the others."""
    parts = {p: Path(p).parts or (p,) for p in dict.fromkeys(paths)}
    names: dict[str, str] = {}
    for path, comps in parts.items():
        for k in range(1, len(comps) + 1):
            tail = comps[-k:]
            if all(other[-k:] != tail for o, other in parts.items() if o != path):
                names[path] = str(Path(*tail))
                break
        else:
            names[path] = path
    return names


def parity_status(parity: Mapping[str, Any]) -> tuple[str, str]:
    """(headline word, css class)."""
    if not parity["checked"]:
        return "not checked", "warn"
    if not parity["verified"]:
        return "not verified", "warn"
    return ("ok", "ok") if parity["passed"] else ("FAILED", "bad")


# Per-output figures shown in the HTML and markdown tables when the parity report has them
# (the JSON holds every field): key, header, format.
_PARITY_COLUMNS = (
    ("mean_abs", "mean abs err", "err"),
    ("cosine", "cosine", "cos"),
    ("snr_db", "SNR dB", "db"),
    ("argmax_agreement", "argmax agree", "share"),
)


def parity_columns(outputs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The optional per-output columns (key, header, kind) that some output has a figure for."""
    return [c for c in _PARITY_COLUMNS if any(o.get(c[0]) is not None for o in outputs)]


def parity_cell(value: Any, kind: str) -> str:
    """A parity figure as text: `kind` cos, db and share besides `figure_text`'s kinds."""
    if isinstance(value, str) or value is None:
        return figure_text(value)
    if kind == "cos":
        return f"{value:.7f}".rstrip("0").rstrip(".") if value != 1 else "1"
    if kind == "db":
        return f"{value:.1f}"
    if kind == "share":
        return f"{value * 100:.1f}%"
    return figure_text(value, kind)


def parity_tolerance(o: Mapping[str, Any], parity: Mapping[str, Any]) -> str | None:
    """'rtol 0.001, atol 1e-06' when this output was judged by its own tolerance."""
    rtol, atol = o.get("rtol", parity["rtol"]), o.get("atol", parity["atol"])
    if rtol == parity["rtol"] and atol == parity["atol"]:
        return None
    return f"rtol {rtol:g}, atol {atol:g}"


def parity_rule_text(parity: Mapping[str, Any]) -> str:
    """How an output is judged, from the criteria when the report has them (plain text)."""
    criteria = parity.get("criteria") or {}
    stat = criteria.get("error_stat", "max")
    if stat == "max":
        measure = "max|new - old|"
    elif stat == "quantile":
        measure = f"the {criteria.get('error_quantile', 0.99):g} quantile of |new - old|"
    else:
        measure = f"the {stat} of |new - old|"
    text = f"{measure} <= atol + rtol * max|old|"
    if criteria.get("min_cosine") is not None:
        text += f" and cosine >= {criteria['min_cosine']:g}"
    return text


def error_sort_key(row: Mapping[str, Any]) -> float:
    """Largest error first; "inf" and "nan" (strings in the data) before every finite figure."""
    value = row["rel_error"]
    return (
        -float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else -math.inf
    )


def quantization_lines(q: Mapping[str, Any]) -> list[str]:
    """Plain-text sentences of the int8 section (escaped by the caller)."""
    b = q["budget"]
    method = f", calibration method {q['method']}" if q.get("method") else ""
    lines = [
        f"Target {q['target']}{method}, "
        f"{q['calibration_samples']} calibration sample(s) from {q['calibration']}"
        + (
            f" in {q['calibration_runs']} run(s) of at most {q['calibration_batch']}"
            if q.get("calibration_runs") and q.get("calibration_batch")
            else ""
        )
        + ".",
        (
            f"Quantized {q['layers_quantized']} of {q['layers_total']} "
            f"Conv/ConvTranspose/Gemm/MatMul layers; {len(q['kept_float'])} kept float "
            f"({b['kept_for_accuracy']} for accuracy), {len(q['weight_only'])} of them with "
            f"int8 weights; bias correction on {len(q['bias_corrected'])} layer(s)."
            if q.get("method")  # int8's statistics pass
            else f"{q['stage']}: changed {q['layers_quantized']} of {q['layers_total']} units; "
            f"{len(q['kept_float'])} kept {q.get('kept_as', 'float')} "
            f"({b['kept_for_accuracy']} for accuracy)."
        ),
        "Error on calibration samples (output noise-to-signal ratio of the worst channel "
        f"group): full {q['stage']} {figure_text(b['full_error'], 'float')} \u2192 final "
        f"{figure_text(b['final_error'], 'float')}, budget "
        f"{figure_text(b['max_error'], 'float')} ({b['sessions']} ORT session(s)).",
    ]
    phases = q.get("phase_seconds") or {}
    if phases:
        lines.append(
            "Time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in phases.items()) + "."
        )
    speed = q.get("speed")
    if speed:
        lines.append(
            f"Speed check (ORT CPU, median of {speed['runs']} "
            + (
                "runs; the float model timed apart"
                if speed.get("float_apart")
                else "interleaved runs"
            )
            + (f" on {shapes_text(speed['input_shapes'])}" if speed.get("input_shapes") else "")
            + f"): float "
            f"{speed['float_ms']:.2f} ms, int8 compute {speed['int8_ms']:.2f} ms"
            + (
                ""
                if speed.get("weights_ms") is None
                else f", float compute with int8 weights {speed['weights_ms']:.2f} ms"
            )
            + f"; the result ({'int8 compute' if speed.get('chosen') == 'int8' else 'float compute, int8 weights'})"
            f" runs {speed['ratio']:.2f}x the float model."
        )
    if q["opset_before"] != q["opset_after"]:
        lines.append(f"Opset raised from {q['opset_before']} to {q['opset_after']}.")
    return lines


def held_out_text(check: Mapping[str, Any], stage: str = "int8") -> str:
    """The sentence above the held-out check's table (plain text, escaped by the caller)."""
    kind = "held-out data" if check["held_out"] else "data that is NOT held out"
    return (
        f"The {stage} model against the original on {check['source']} ({kind}, "
        f"{check['samples']} run(s)): noise-to-signal {figure_text(check['error'], 'float')} "
        "(worst channel group)"
        + (
            f"; task metric {check['metric']}: {figure_text(check['metric_value'], 'float')}"
            if check.get("metric")
            else ""
        )
        + "."
    )


def held_out_rows(check: Mapping[str, Any], esc: Any) -> list[list[str]]:
    """The held-out check's table rows (`HELD_OUT_HEADERS`); `esc` escapes the output names."""
    return [
        [
            esc(o["name"]),
            parity_cell(o["cosine"], "cos"),
            parity_cell(o["snr_db"], "db"),
            parity_cell(o["nsr"], "err"),
            parity_cell(o["argmax_agreement"], "share"),
        ]
        for o in check["outputs"]
    ]


#: the held-out check's table: header, numeric
HELD_OUT_HEADERS = (
    ("output", False),
    ("cosine", True),
    ("SNR dB", True),
    ("NSR", True),
    ("argmax agree", True),
)


SYNTHETIC_WARNING = (
    "Calibrated on random inputs (--calibration-data random): the activation ranges do not "
    "come from real data."
)


#: the benchmark table (`bench_cells`): header, numeric
BENCH_HEADERS = (
    ("model", False),
    ("provider", False),
    ("p50 ms", True),
    ("p90 ms", True),
    ("mean ms", True),
    ("throughput /s", True),
    ("session s", True),
    ("peak MB", True),
    ("ratio", True),
    ("runs", True),
    ("placement", False),
)


def bench_inputs(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The input shapes every benchmark row ran on, when they are the same for all (then said
    once, above the table); None when they differ (then `bench_cells` gives each row's)."""
    texts = {shapes_text(r.get("input_shapes")) for r in rows}
    return texts.pop() if len(texts) == 1 else None


def bench_headers(rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, bool], ...]:
    """`BENCH_HEADERS`, with an inputs column when the rows ran on different shapes."""
    if bench_inputs(rows) is not None:
        return BENCH_HEADERS
    return (*BENCH_HEADERS[:-1], ("inputs", False), BENCH_HEADERS[-1])


#: the benchmark rows' roles (`onnxshrink.bench.benchmark_optimized`) in the model column
ROLE_TEXT = {"original": "original", "lossless": "lossless fp32", "result": "result"}

#: what the benchmark's peak MB column measures (the reports' note under the table)
PEAK_NOTE = (
    "peak MB: how far the process's peak resident memory rose over this model's session "
    "creation and first run (free heap memory handed back to the system first, so that memory "
    "freed earlier does not hide it); on GPU rows, device memory growth; "
    "\u2013 where it could not be measured"
)


def bench_cells(
    row: Mapping[str, Any],
    esc: Any,
    model_cell: Any = None,
    sep: str = ", ",
    inputs: bool = False,
) -> list[str]:
    """One benchmark table row; `esc` escapes text for the target format, `model_cell` (the
    path -> cell text) overrides the model column, `sep` joins the placement shares, `inputs`
    adds the input shapes (`bench_headers`)."""
    model = model_cell(row["model"]) if model_cell else esc(row["model"])
    role = ROLE_TEXT.get(str(row.get("role")))
    return [
        f"{esc(role)}: {model}" if role else model,
        esc(short_provider(str(row["provider"]))),
        figure_text(row["p50_ms"], "ms"),
        figure_text(row["p90_ms"], "ms"),
        figure_text(row["mean_ms"], "ms"),
        figure_text(row["throughput"], "float"),
        figure_text(row["session_s"], "s"),
        figure_text(row["peak_mb"], "float"),
        figure_text(row["ratio"], "ratio"),
        figure_text(row["runs"]),
        *([esc(shapes_text(row.get("input_shapes"))) or "\u2013"] if inputs else []),
        sep.join(esc(part) for part in _placement_parts(row["placement"])) or "\u2013",
    ]


def bench_settings_text(settings: Mapping[str, Any]) -> str:
    """The benchmark's settings in words: warm-up and timed rounds, I/O binding, batch."""
    parts = []
    if "warmup" in settings:
        parts.append(f"{settings['warmup']} warm-up rounds")
    if "runs" in settings:
        parts.append(f"{settings['runs']} timed rounds, models interleaved")
    if "iobinding" in settings:
        parts.append("I/O binding" if settings["iobinding"] else "inputs copied every run")
    if settings.get("batch") is not None:
        parts.append(f"batch {settings['batch']}")
    return ", ".join(parts)


def kv_text(value: Any) -> str:
    """A value of the environment list as text: lists and mappings joined, None as (none)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "(none)"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "(none)"
    return "(none)" if value is None else str(value)
