"""The optimization report: one document with everything `optimize` did and measured.

`write_report(path, result, ...)` picks the format from the suffix:

1. `.html` (or `.htm`): a single self-contained page (inline CSS, charts as base64 SVG `data:`
   images from `onnxshrink.report.charts`, no script, nothing fetched from the network).
2. `.md`: the same tables as GitHub-flavoured markdown; no charts (GitHub does not show `data:`
   images), a line says so.
3. `.json`: every figure, numbers as numbers; non-finite floats become the strings "inf",
   "-inf", "nan" so the file is strict JSON.

Contents: the command, versions and date; before/after size, node counts, initializers and
parameters; the op-type histogram; rules applied (times, seconds), rules that declined (reason,
times); notes; the parity table; the benchmark table when a bench report is given; per-layer
errors when given; with int8 quantization, its settings, counts, every layer kept float and
why, the sensitivity ranking (bars in HTML) and the check of the int8 model against the original
(`onnxshrink.rules.int8`, read duck-typed too). The bench report comes from `onnxshrink.bench` and
is read duck-typed (attributes or mapping keys: `rows`, `skipped`, `environment`; row fields
`model, provider, p50_ms, p90_ms, mean_ms, throughput, session_s, peak_mb, placement, ratio,
runs`), so this module never imports it. Every user-controlled string (paths, node, output and layer names) is escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxshrink.engine.io import check_output_path, write_text_atomic
from onnxshrink.errors import UsageError
from onnxshrink.report import charts

if TYPE_CHECKING:  # onnxshrink.bench is only read duck-typed, never imported at run time
    from onnxshrink.bench import BenchReport
    from onnxshrink.engine.optimize import OptimizeResult

logger = logging.getLogger(__name__)

SCHEMA = "onnxshrink.report/1"
FORMATS = {".html": "html", ".htm": "html", ".md": "markdown", ".json": "json"}
_BENCH_FIELDS = (
    "model",
    "provider",
    "p50_ms",
    "p90_ms",
    "mean_ms",
    "throughput",
    "session_s",
    "peak_mb",
    "placement",
    "ratio",
    "runs",
)
_LAYER_ERRORS_SHOWN = 20


def report_format(path: str | os.PathLike[str]) -> str:
    """The format a report path asks for ("html", "markdown", "json"); UsageError otherwise.

    Call it before long work so that a bad `--report` fails first; it also checks the folder.
    """
    dest = Path(path)
    fmt = FORMATS.get(dest.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"{dest}: unknown report format {dest.suffix or '(no suffix)'!r}; "
            "use .html, .md or .json"
        )
    check_output_path(dest)
    return fmt


def write_report(
    path: str | os.PathLike[str],
    result: OptimizeResult,
    *,
    command: str,
    model_path: str | os.PathLike[str] | None,
    output_path: str | os.PathLike[str] | None,
    bench: BenchReport | None = None,
    layer_errors: Sequence[tuple[str, float]] | None = None,
) -> Path:
    """Write the report for an `OptimizeResult`; the format follows the suffix (.html .md .json).

    Atomic: written to a temporary file in the same folder, then renamed into place; nothing is
    left behind on failure. Raises UsageError for an unknown suffix or an unusable folder.
    """
    dest = Path(path)
    fmt = report_format(dest)
    args: dict[str, Any] = dict(
        command=command,
        model_path=model_path,
        output_path=output_path,
        bench=bench,
        layer_errors=layer_errors,
    )
    if fmt == "html":
        text = render_html(result, **args)
    elif fmt == "markdown":
        text = render_markdown(result, **args)
    else:
        text = json.dumps(report_dict(result, **args), indent=2, allow_nan=False) + "\n"
    write_text_atomic(dest, text)
    logger.info("report written to %s", dest)
    return dest


# --------------------------------------------------------------------------------------------
# The figures, shared by every format.


def versions() -> dict[str, str]:
    """Versions of onnxshrink, its runtime dependencies, Python and the platform."""
    from importlib import metadata

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    import onnx

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    try:
        import onnx_graphsurgeon

        gs_version = onnx_graphsurgeon.__version__
    except ImportError:
        gs_version = dist("onnx-graphsurgeon")
    import numpy

    return {
        "onnxshrink": _onnxshrink_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort_version,
        "onnx-graphsurgeon": gs_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _onnxshrink_version() -> str:
    import onnxshrink

    return onnxshrink.__version__


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats to strings, numpy scalars to Python, tuples to lists."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _clean(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "item"):  # numpy scalar
        return _clean(value.item())
    return str(value)


def _pct(before: float, after: float) -> float | None:
    return None if not before else (after - before) / before * 100


def _summary(s: Any) -> dict[str, int]:
    return {
        "nodes": int(s.nodes),
        "nodes_total": int(s.nodes_total),
        "initializers": int(s.initializers),
        "parameters": int(s.parameters),
        "bytes": int(s.bytes),
    }


_SUMMARY_ROWS = (
    ("nodes", "nodes"),
    ("nodes_total", "nodes incl. subgraphs"),
    ("initializers", "initializers"),
    ("parameters", "parameters"),
    ("bytes", "size"),
)


def _op_rows(before: Mapping[str, int], after: Mapping[str, int]) -> list[dict[str, Any]]:
    """Every op type; changed ones first (largest change first), then by count."""
    rows: list[dict[str, Any]] = [
        {"op": op, "before": int(before.get(op, 0)), "after": int(after.get(op, 0))}
        for op in set(before) | set(after)
    ]
    for row in rows:
        row["change"] = row["after"] - row["before"]
    rows.sort(key=lambda r: (r["change"] == 0, -abs(r["change"]), -r["after"], r["op"]))
    return rows


def _rule_rows(stats: Any) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    applied = stats.applied
    seconds = stats.seconds
    rows = [
        {"rule": name, "times": int(count), "seconds": float(seconds.get(name, 0.0))}
        for name, count in sorted(applied.items(), key=lambda kv: (-kv[1], kv[0]))
        if count
    ]
    idle = sorted(name for name in seconds if not applied.get(name))
    declined = [
        {"rule": rule, "reason": reason, "times": int(count)}
        for (rule, reason), count in sorted(
            stats.declined.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1])
        )
    ]
    return rows, idle, declined


def _parity_dict(parity: Any) -> dict[str, Any]:
    if parity is None:
        return {"checked": False, "reason": "not checked (--no-verify)"}
    outputs = []
    for o in parity.outputs:
        item = (
            {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
            if dataclasses.is_dataclass(o)
            else {"name": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel, "ok": o.ok}
        )
        outputs.append(item)
    return {
        "checked": True,
        "verified": bool(parity.verified),
        "passed": bool(parity.passed),
        "rtol": parity.rtol,
        "atol": _get(parity, "atol"),
        "samples": int(_get(parity, "samples", 0) or 0),
        "reason": _get(parity, "reason"),
        "criteria": _get(parity, "criteria"),
        "outputs": outputs,
    }


def _as_dict(obj: Any) -> dict[str, Any]:
    """A mapping, a dataclass instance or a plain object as a dict of its fields."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _bench_dict(bench: Any) -> dict[str, Any] | None:
    """Rows (every field the row has; the documented ones always), skipped, environment."""
    if bench is None:
        return None
    rows = []
    for row in _get(bench, "rows", []) or []:
        item = {name: _get(row, name) for name in _BENCH_FIELDS}
        item.update({k: v for k, v in _as_dict(row).items() if k not in item})
        rows.append(item)
    skipped = [
        {"what": str(item[0]), "reason": str(item[1])}
        if isinstance(item, (tuple, list)) and len(item) == 2
        else {"what": str(_get(item, "provider", item)), "reason": str(_get(item, "reason", ""))}
        for item in _get(bench, "skipped", []) or []
    ]
    settings = {
        k: _get(bench, k)
        for k in ("warmup", "runs", "iobinding", "batch")
        if _get(bench, k) is not None
    }
    return {
        "rows": rows,
        "skipped": skipped,
        "settings": settings,
        "environment": _as_dict(_get(bench, "environment")),
    }


def report_dict(
    result: OptimizeResult,
    *,
    command: str,
    model_path: str | os.PathLike[str] | None,
    output_path: str | os.PathLike[str] | None,
    bench: BenchReport | None = None,
    layer_errors: Sequence[tuple[str, float]] | None = None,
    generated: _dt.datetime | None = None,
) -> dict[str, Any]:
    """Every figure of the report as JSON-ready data (what the .json report holds).

    Percent changes are None where the before figure is 0; non-finite floats are strings.
    """
    before, after = _summary(result.before), _summary(result.after)
    applied, idle, declined = _rule_rows(result.stats)
    when = generated or _dt.datetime.now(_dt.timezone.utc)
    data = {
        "schema": SCHEMA,
        "generated": when.isoformat(timespec="seconds"),
        "command": command,
        "versions": versions(),
        "model": str(model_path) if model_path is not None else None,
        "output": str(output_path) if output_path is not None else None,
        "seconds": float(result.seconds),
        "summary": {
            "before": before,
            "after": after,
            "change_pct": {k: _pct(before[k], after[k]) for k in before},
        },
        "ops": _op_rows(result.before.ops, result.after.ops),
        "rules": {"applied": applied, "ran_without_change": idle, "declined": declined},
        "notes": list(result.notes),
        "parity": _parity_dict(result.parity),
        "bench": _bench_dict(bench),
        "layer_errors": (
            [{"layer": name, "rel_error": err} for name, err in layer_errors]
            if layer_errors is not None
            else None
        ),
        "quantization": _quantization_dict(
            _get(result, "quantization"), _get(result, "quantized_parity")
        ),
    }
    return _clean(data)


def _layer_dict(layer: Any) -> dict[str, Any]:
    return {
        "name": _get(layer, "name"),
        "op": _get(layer, "op"),
        "precision": _get(layer, "precision"),
        "reason": _get(layer, "reason"),
        "error": _get(layer, "error"),
    }


def _quantization_dict(quant: Any, check: Any) -> dict[str, Any] | None:
    """Settings, counts, every layer's decision, the sensitivity ranking, the held-out check.

    Read duck-typed from `onnxshrink.rules.int8.Int8Result` and `HeldOutCheck` (attributes or keys).
    """
    if quant is None:
        return None
    budget = _get(quant, "budget")
    qreport = _get(quant, "quantize")
    layers = [_layer_dict(layer) for layer in _get(quant, "layers", []) or []]
    kept = [layer for layer in layers if layer["precision"] == "float"]
    data: dict[str, Any] = {
        "stage": _get(quant, "stage") or "int8",
        "target": _get(quant, "target"),
        "method": _get(quant, "method"),
        "calibration": _get(quant, "calibration"),
        "calibration_runs": _get(quant, "feeds"),
        "calibration_samples": _get(quant, "samples") or _get(quant, "feeds"),
        "calibration_batch": _get(quant, "batch"),
        "synthetic": bool(_get(quant, "synthetic", False)),
        "calibration_seconds": _get(quant, "seconds"),
        "phase_seconds": dict(_get(quant, "timings", {}) or {}),
        "layers_total": len(layers),
        "layers_quantized": len(layers) - len(kept),
        "weight_only": list(_get(qreport, "weight_only", []) or []),
        "bias_corrected": list(_get(qreport, "bias_corrected", []) or []),
        "kept_float": kept,
        "layers": layers,
        "budget": {
            "max_error": _get(budget, "max_error"),
            "full_error": _get(budget, "full_error"),
            "final_error": _get(budget, "final_error"),
            "within_budget": _get(budget, "within_budget"),
            "kept_for_accuracy": len(_get(budget, "kept_float", {}) or {}),
            "sessions": _get(budget, "sessions"),
            "steps": [list(step) for step in _get(budget, "steps", []) or []],
        },
        "speed": (
            {
                "float_ms": _get(speed, "float_ms"),
                "int8_ms": _get(speed, "int8_ms"),
                "weights_ms": _get(speed, "weights_ms"),
                "chosen": _get(speed, "chosen"),
                "ratio": _get(speed, "ratio"),
                "runs": _get(speed, "runs"),
            }
            if (speed := _get(quant, "speed")) is not None
            else None
        ),
        "sensitivity": [
            {"layer": _get(e, "name"), "op": _get(e, "op"), "error": _get(e, "error")}
            for e in _get(budget, "ranking", []) or []
        ],
        "opset_before": _get(qreport, "opset_before"),
        "opset_after": _get(qreport, "opset_after"),
        "quantize_linear": _get(qreport, "quantize_linear"),
        "dequantize_linear": _get(qreport, "dequantize_linear"),
        "held_out_check": None,
    }
    if check is not None:
        data["held_out_check"] = {
            "samples": _get(check, "samples"),
            "source": _get(check, "source"),
            "held_out": bool(_get(check, "held_out")),
            "verified": bool(_get(check, "verified")),
            "reason": _get(check, "reason"),
            "error": _get(check, "error"),
            "metric": _get(check, "metric"),
            "metric_value": _get(check, "metric_value"),
            "outputs": [
                {
                    "name": _get(o, "name"),
                    "cosine": _get(o, "cosine"),
                    "snr_db": _get(o, "snr_db"),
                    "nsr": _get(o, "nsr"),
                    "argmax_agreement": _get(o, "argmax_agreement"),
                }
                for o in _get(check, "outputs", []) or []
            ],
        }
    return data


def _quantization_lines(q: Mapping[str, Any]) -> list[str]:
    """Plain-text sentences of the int8 section (escaped by the caller)."""
    b = q["budget"]
    lines = [
        f"Target {q['target']}, calibration method {q['method']}, "
        f"{q['calibration_samples']} calibration sample(s) from {q['calibration']}"
        + (
            f" in {q['calibration_runs']} run(s) of at most {q['calibration_batch']}"
            if q.get("calibration_runs") and q.get("calibration_batch")
            else ""
        )
        + ".",
        f"Quantized {q['layers_quantized']} of {q['layers_total']} Conv/ConvTranspose/Gemm/MatMul "
        f"layers; {len(q['kept_float'])} kept float ({b['kept_for_accuracy']} for accuracy), "
        f"{len(q['weight_only'])} of them with int8 weights; bias correction on "
        f"{len(q['bias_corrected'])} layer(s).",
        "Error on calibration samples (output noise-to-signal ratio of the worst channel "
        f"group): full {q['stage']} {_num(b['full_error'], 'float')} \u2192 final "
        f"{_num(b['final_error'], 'float')}, budget {_num(b['max_error'], 'float')} "
        f"({b['sessions']} ORT session(s)).",
    ]
    phases = q.get("phase_seconds") or {}
    if phases:
        lines.append(
            "Time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in phases.items()) + "."
        )
    speed = q.get("speed")
    if speed:
        lines.append(
            f"Speed check (ORT CPU, median of {speed['runs']} interleaved runs): float "
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


def _held_out_text(check: Mapping[str, Any], stage: str = "int8") -> str:
    kind = "held-out data" if check["held_out"] else "data that is NOT held out"
    return (
        f"The {stage} model against the original on {check['source']} ({kind}, "
        f"{check['samples']} run(s)): noise-to-signal {_num(check['error'], 'float')} (worst "
        "channel group)"
        + (
            f"; task metric {check['metric']}: {_num(check['metric_value'], 'float')}"
            if check.get("metric")
            else ""
        )
        + "."
    )


def _held_out_rows(check: Mapping[str, Any], esc: Any) -> list[list[str]]:
    return [
        [
            esc(o["name"]),
            _parity_cell(o["cosine"], "cos"),
            _parity_cell(o["snr_db"], "db"),
            _parity_cell(o["nsr"], "err"),
            _parity_cell(o["argmax_agreement"], "share"),
        ]
        for o in check["outputs"]
    ]


_HELD_OUT_HEADERS = (
    ("output", False),
    ("cosine", True),
    ("SNR dB", True),
    ("NSR", True),
    ("argmax agree", True),
)
_SYNTHETIC_WARNING = (
    "Calibrated on random inputs (--calibration-data random): the activation ranges do not "
    "come from real data."
)


def _sensitivity_chart(sensitivity: Sequence[Mapping[str, Any]]) -> str | None:
    """Bars of the sensitivity ranking: output NSR with one layer quantized alone."""
    finite = [
        (str(e["layer"]), float(e["error"]))
        for e in sensitivity
        if isinstance(e["error"], (int, float)) and math.isfinite(e["error"])
    ]
    if not finite:
        return None
    top = sorted(finite, key=lambda item: -item[1])[:_LAYER_ERRORS_SHOWN]
    positive = [e for _, e in top if e > 0]
    return charts.horizontal_bars(
        [name for name, _ in top],
        [charts.Series("noise-to-signal", [e for _, e in top], "#c9503c")],
        title=f"Sensitivity: output error with one layer quantized alone (largest {len(top)} "
        f"of {len(sensitivity)})",
        axis_label="output noise-to-signal ratio",
        log=bool(positive) and max(positive) / min(positive) > 100,
        value_format="{:.2e}",
    )


# --------------------------------------------------------------------------------------------
# Formatting helpers.


def format_bytes(n: float) -> str:
    """Sizes the way the CLI prints them (1024-based, one decimal)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _num(value: Any, kind: str = "int") -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, str):  # "inf"/"nan" from _clean
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


def _summary_cell(key: str, value: int) -> str:
    return format_bytes(value) if key == "bytes" else f"{value:,d}"


_PROVIDER_NAMES = {
    "CPUExecutionProvider": "CPU",
    "CUDAExecutionProvider": "CUDA",
    "TensorrtExecutionProvider": "TensorRT",
    "cpu": "CPU",
    "cuda": "CUDA",
    "tensorrt": "TensorRT",
}


def _short_provider(name: str) -> str:
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
    return [f"{_short_provider(k)} {v * scale:.0f}%" for k, v in ordered]


def _parity_status(parity: Mapping[str, Any]) -> tuple[str, str]:
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


def _parity_columns(outputs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [c for c in _PARITY_COLUMNS if any(o.get(c[0]) is not None for o in outputs)]


def _parity_cell(value: Any, kind: str) -> str:
    if isinstance(value, str) or value is None:
        return _num(value)
    if kind == "cos":
        return f"{value:.7f}".rstrip("0").rstrip(".") if value != 1 else "1"
    if kind == "db":
        return f"{value:.1f}"
    if kind == "share":
        return f"{value * 100:.1f}%"
    return _num(value, kind)


def _parity_tolerance(o: Mapping[str, Any], parity: Mapping[str, Any]) -> str | None:
    """'rtol 0.001, atol 1e-06' when this output was judged by its own tolerance."""
    rtol, atol = o.get("rtol", parity["rtol"]), o.get("atol", parity["atol"])
    if rtol == parity["rtol"] and atol == parity["atol"]:
        return None
    return f"rtol {rtol:g}, atol {atol:g}"


def _parity_rule_text(parity: Mapping[str, Any]) -> str:
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


def _model_name(model_path: Any, result: Any) -> str:
    if model_path is not None:
        return Path(model_path).name
    graph_name = getattr(getattr(getattr(result, "model", None), "graph", None), "name", "")
    return graph_name or "model"


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


def _bench_label(row: Mapping[str, Any], names: Mapping[str, str], single_provider: bool) -> str:
    model = names.get(str(row["model"]), str(row["model"]))
    if single_provider:
        return model
    return f"{model} \u00b7 {_short_provider(str(row['provider']))}"


def _error_sort_key(row: Mapping[str, Any]) -> float:
    """Largest error first; "inf" and "nan" (from `_clean`) before every finite figure."""
    value = row["rel_error"]
    return (
        -float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else -math.inf
    )


_BENCH_HEADERS = (
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


def _bench_cells(
    row: Mapping[str, Any], esc: Any, model_cell: Any = None, sep: str = ", "
) -> list[str]:
    """One benchmark table row; `esc` escapes text for the target format, `model_cell` (the
    path -> cell text) overrides the model column, `sep` joins the placement shares."""
    return [
        model_cell(row["model"]) if model_cell else esc(row["model"]),
        esc(_short_provider(str(row["provider"]))),
        _num(row["p50_ms"], "ms"),
        _num(row["p90_ms"], "ms"),
        _num(row["mean_ms"], "ms"),
        _num(row["throughput"], "float"),
        _num(row["session_s"], "s"),
        _num(row["peak_mb"], "float"),
        _num(row["ratio"], "ratio"),
        _num(row["runs"]),
        sep.join(esc(part) for part in _placement_parts(row["placement"])) or "\u2013",
    ]


def _bench_settings_text(settings: Mapping[str, Any]) -> str:
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


def _kv_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "(none)"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "(none)"
    return "(none)" if value is None else str(value)


def _svg_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


# --------------------------------------------------------------------------------------------
# HTML.

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


def _figures(
    result: OptimizeResult,
    command: str,
    model_path: str | os.PathLike[str] | None,
    output_path: str | os.PathLike[str] | None,
    bench: BenchReport | None,
    layer_errors: Sequence[tuple[str, float]] | None,
) -> tuple[dict[str, Any], str]:
    """The report's figures (`report_dict`) and the model's display name, for HTML and markdown."""
    d = report_dict(
        result,
        command=command,
        model_path=model_path,
        output_path=output_path,
        bench=bench,
        layer_errors=layer_errors,
    )
    return d, _model_name(model_path, result)


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
    d, name = _figures(result, command, model_path, output_path, bench, layer_errors)
    before, after, change = (d["summary"][k] for k in ("before", "after", "change_pct"))
    parity = d["parity"]
    status, status_cls = _parity_status(parity)
    body: list[str] = []

    # Header with the headline figures.
    rel = [o.get("max_rel") for o in parity.get("outputs", [])]
    worst: float | None = max((float(v) for v in rel if isinstance(v, (int, float))), default=None)
    if any(v in ("inf", "nan") for v in rel):
        worst = math.inf
    if not parity["checked"]:
        parity_detail = "--no-verify"
    elif not parity["verified"]:
        parity_detail = _e(parity.get("reason") or "")
    else:
        parity_detail = (
            f"max rel err {worst:.2e}, rtol {parity['rtol']:g}"
            if worst is not None
            else f"rtol {parity['rtol']:g}"
        )

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
        card("parity", _e(status), parity_detail, status_cls),
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
    for key, label in _SUMMARY_ROWS:
        rows.append(
            [
                _e(label),
                _summary_cell(key, before[key]),
                _summary_cell(key, after[key]),
                _num(change[key], "pct"),
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
                [_e(r["op"]), _num(r["before"]), _num(r["after"]), _num(r["change"], "delta")]
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
                    [_e(r["rule"]), _num(r["times"]), _num(r["seconds"], "s")]
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
                [[_e(r["rule"]), _e(r["reason"]), _num(r["times"])] for r in rules["declined"]],
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
            f"<p>ONNX Runtime CPU, {parity['samples']} input sample(s). An output passes when "
            f"<code>{_e(_parity_rule_text(parity))}</code> with rtol "
            f"{parity['rtol']:g}"
            + (f" and atol {atol:g}" if isinstance(atol, float) else "")
            + "; the relative error is <code>max|new \u2212 old| / max|old|</code>.</p>"
        )
        outputs = parity["outputs"]
        columns = _parity_columns(outputs)
        own_tolerance = [_parity_tolerance(o, parity) for o in outputs]
        headers = [("output", False), ("max abs err", True), ("max rel err", True)]
        headers += [(_e(title), True) for _, title, _ in columns]
        if any(own_tolerance):
            headers.append(("tolerance", False))
        headers.append(("result", False))
        prow = []
        for o, tol in zip(outputs, own_tolerance, strict=True):
            cells = [_e(o["name"]), _num(o["max_abs"], "err"), _num(o["max_rel"], "err")]
            cells += [_parity_cell(o.get(key), kind) for key, _, kind in columns]
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
        body.append(f'<section id="quantization"><h2>{_e(quant["stage"])} quantization</h2>')
        if quant["synthetic"]:
            body.append(f'<p class="warn">{_e(_SYNTHETIC_WARNING)}</p>')
        body.extend(f"<p>{_e(line)}</p>" for line in _quantization_lines(quant))
        if quant["kept_float"]:
            body.append(
                _table(
                    [("layer", False), ("op", False), ("reason", False)],
                    [
                        [_e(k["name"]), _e(k["op"]), _e(k["reason"] or "")]
                        for k in quant["kept_float"]
                    ],
                    table_id="kept-float-table",
                    caption="layers kept float, and why",
                    name_cols=(0, 2),
                )
            )
        if quant["sensitivity"]:
            body.append(
                _img(
                    _sensitivity_chart(quant["sensitivity"]),
                    "Bar chart: output noise-to-signal ratio with one layer quantized alone",
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
            body.append(f"<p{cls}>{_e(_held_out_text(check, quant['stage']))}</p>")
            body.append(
                _table(
                    _HELD_OUT_HEADERS,
                    _held_out_rows(check, _e),
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
                f"<p>Provider: <b>{_e(_short_provider(str(next(iter(providers)))))}</b>.</p>"
            )
        names = short_names([str(r["model"]) for r in brows])
        timed = [r for r in brows if isinstance(r["p50_ms"], (int, float))]
        if timed:
            svg = charts.latency_chart(
                [_bench_label(r, names, single) for r in timed],
                [float(r["p50_ms"]) for r in timed],
                [r["p90_ms"] if isinstance(r["p90_ms"], (int, float)) else None for r in timed],
                groups=None if single else [_short_provider(str(r["provider"])) for r in timed],
            )
            body.append(_img(svg, "Bar chart: p50 latency per model and provider, whiskers to p90"))
        if brows:
            settings = _bench_settings_text(bench_d["settings"])
            body.append(
                _table(
                    _BENCH_HEADERS,
                    [
                        _bench_cells(
                            r,
                            _e,
                            lambda m: (
                                f'<span title="{_e(m)}">{_e_path(names.get(str(m), m))}</span>'
                            ),
                            sep="<br>",
                        )
                        for r in brows
                    ],
                    table_id="bench-table",
                    caption=(f"{_e(settings)}; " if settings else "")
                    + "ratio: p50 against the first model on the same provider (below 1 is "
                    "faster); placement: share of the nodes ORT ran on each provider",
                    name_cols=(0,),
                )
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
                f'<li class="warn"><b>{_e(m)}</b> on {_e(_short_provider(str(p)))}: {_e(w)}</li>'
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
                f"<dt>{_e(k)}</dt><dd>{_e(_kv_text(v))}</dd>" for k, v in environment.items()
            )
            body.append("</dl>")
        body.append("</section>")

    # Per-layer error.
    if layer_errors is not None:
        body.append('<section id="layer-errors"><h2>Error per layer</h2>')
        errors_svg = charts.layer_error_chart(layer_errors, limit=_LAYER_ERRORS_SHOWN)
        if errors_svg:
            body.append(_img(errors_svg, "Bar chart: relative error per layer, largest first"))
        top = sorted(
            d["layer_errors"],
            key=_error_sort_key,
        )[:_LAYER_ERRORS_SHOWN]
        if top:
            # The chart shows the same figures; the table is there for full names and copying.
            body.append(
                f"<details><summary>the {len(top)} largest of {len(layer_errors)} as a table"
                "</summary>"
            )
            body.append(
                _table(
                    [("layer", False), ("relative error", True)],
                    [[_e(r["layer"]), _num(r["rel_error"], "err")] for r in top],
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


# --------------------------------------------------------------------------------------------
# Markdown.


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
    d, name = _figures(result, command, model_path, output_path, bench, layer_errors)
    before, after, change = (d["summary"][k] for k in ("before", "after", "change_pct"))
    parity = d["parity"]
    status, _ = _parity_status(parity)
    out: list[str] = [f"# onnxshrink report: {_md(name)}", ""]
    fence = "````" if "```" in command else "```"
    out += [fence, f"$ {command}", fence, ""]

    def pct(key: str) -> str:
        return "n/a" if change[key] is None else f"{change[key]:+.1f}%"

    out.append(
        f"**nodes** {before['nodes']:,} \u2192 {after['nodes']:,} ({pct('nodes')}) \u00b7 "
        f"**size** {format_bytes(before['bytes'])} \u2192 {format_bytes(after['bytes'])} "
        f"({pct('bytes')}) \u00b7 **parity** {status} \u00b7 **time** {d['seconds']:.2f} s"
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
                    _summary_cell(key, before[key]),
                    _summary_cell(key, after[key]),
                    _num(change[key], "pct"),
                ]
                for key, label in _SUMMARY_ROWS
            ],
        )
    )
    out += ["", "## Op types", "", "All op types, the ones whose count changed first.", ""]
    out.append(
        _md_table(
            [("op", False), ("before", True), ("after", True), ("change", True)],
            [
                [_md(r["op"]), _num(r["before"]), _num(r["after"]), _num(r["change"], "delta")]
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
                    [_md(r["rule"]), _num(r["times"]), _num(r["seconds"], "s")]
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
                [[_md(r["rule"]), _md(r["reason"]), _num(r["times"])] for r in rules["declined"]],
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
            f"ONNX Runtime CPU, {parity['samples']} input sample(s), rtol {parity['rtol']:g}"
            + (f", atol {atol:g}" if isinstance(atol, float) else "")
            + f". An output passes when `{_parity_rule_text(parity)}`."
        )
        out.append("")
        outputs = parity["outputs"]
        columns = _parity_columns(outputs)
        own_tolerance = [_parity_tolerance(o, parity) for o in outputs]
        headers = [("output", False), ("max abs err", True), ("max rel err", True)]
        headers += [(title, True) for _, title, _ in columns]
        if any(own_tolerance):
            headers.append(("tolerance", False))
        headers.append(("result", False))
        rows = []
        for o, tol in zip(outputs, own_tolerance, strict=True):
            cells = [_md(o["name"]), _num(o["max_abs"], "err"), _num(o["max_rel"], "err")]
            cells += [_parity_cell(o.get(key), kind) for key, _, kind in columns]
            if any(own_tolerance):
                cells.append(_md(tol or "default"))
            reason = f": {_md(o['reason'])}" if o.get("reason") else ""
            cells.append("ok" if o["ok"] else f"**FAIL**{reason}")
            rows.append(cells)
        out.append(_md_table(headers, rows))
    quant = d["quantization"]
    if quant is not None:
        out += ["", f"## {quant['stage']} quantization", ""]
        if quant["synthetic"]:
            out += [f"**Warning:** {_md(_SYNTHETIC_WARNING)}", ""]
        for line in _quantization_lines(quant):
            out += [_md(line), ""]
        if quant["kept_float"]:
            out += ["Layers kept float, and why:", ""]
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
            top = quant["sensitivity"][:_LAYER_ERRORS_SHOWN]  # ranked, largest first
            out += [
                f"Sensitivity (output NSR with one layer quantized alone), the {len(top)} "
                f"largest of {len(quant['sensitivity'])}:",
                "",
            ]
            out.append(
                _md_table(
                    [("layer", False), ("op", False), ("NSR alone", True)],
                    [[_md(e["layer"]), _md(e["op"]), _num(e["error"], "err")] for e in top],
                )
            )
            out.append("")
        check = quant["held_out_check"]
        if check is None:
            out.append(f"The {quant['stage']} model was not checked (--no-verify).")
        elif not check["verified"]:
            out.append(f"The {quant['stage']} model could not be checked: {_md(check['reason'])}")
        else:
            out += [_md(_held_out_text(check, quant["stage"])), ""]
            out.append(_md_table(_HELD_OUT_HEADERS, _held_out_rows(check, _md)))
    bench_d = d["bench"]
    if bench_d is not None:
        out += ["", "## Benchmark", ""]
        if bench_d["rows"]:
            out.append(_md_table(_BENCH_HEADERS, [_bench_cells(r, _md) for r in bench_d["rows"]]))
            settings = _bench_settings_text(bench_d["settings"])
            out += [
                "",
                (f"{settings}; " if settings else "")
                + "ratio: p50 against the first model on the same provider (below 1 is "
                "faster); placement: share of the nodes ORT ran on each provider.",
            ]
            warnings = [
                (r["model"], r["provider"], w)
                for r in bench_d["rows"]
                for w in (r.get("warnings") or [])
            ]
            if warnings:
                out += ["", "Warnings:", ""]
                out += [
                    f"- **{_md(m)}** on {_md(_short_provider(str(p)))}: {_md(w)}"
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
                    f"{_md(k)} {_md(_kv_text(v))}"
                    for k, v in bench_d["environment"].items()
                    if v not in (None, "")
                ),
            ]
    if layer_errors is not None:
        out += ["", "## Error per layer", ""]
        top = sorted(
            d["layer_errors"],
            key=_error_sort_key,
        )[:_LAYER_ERRORS_SHOWN]
        if top:
            out.append(f"The {len(top)} largest of {len(layer_errors)}.")
            out.append("")
            out.append(
                _md_table(
                    [("layer", False), ("relative error", True)],
                    [[_md(r["layer"]), _num(r["rel_error"], "err")] for r in top],
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
