"""The report's data: every figure of an `OptimizeResult` as JSON-ready dicts.

`report_dict` is what the .json report holds, and what the HTML and markdown renderers read
(through `figures`): the command, versions and date; before/after summaries and their percent
changes; the op-type histogram; rules applied, idle and declined; notes; the parity report; the
benchmark; per-layer errors; the lossy stage (settings, every layer's decision, the sensitivity
ranking, the held-out check). Non-finite floats become the strings "inf", "-inf", "nan".

The bench report comes from `onnxshrink.bench` and is read duck-typed (attributes or mapping
keys: `rows`, `skipped`, `environment`; row fields `model, provider, p50_ms, p90_ms, mean_ms,
throughput, session_s, peak_mb, placement, ratio, runs, input_shapes, role`), and so is the lossy stage's result
(`onnxshrink.quant.lossy.StageResult`, `HeldOutCheck`), so this module imports neither.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # onnxshrink.bench is only read duck-typed, never imported at run time
    from onnxshrink.bench import BenchReport
    from onnxshrink.engine.optimize import OptimizeResult


SCHEMA = "onnxshrink.report/1"
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
    "input_shapes",
    "role",
    "peak_source",
)


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


def parity_seen_text(parity: Mapping[str, Any]) -> str:
    """`samples_text` of a report's parity section (`samples` runs, `rows` samples)."""
    from onnxshrink.verify.parity import samples_text

    return samples_text(parity.get("samples", 0), parity.get("rows", 0))


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
        "rows": int(_get(parity, "rows", 0) or 0),
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
    data["headline"] = headline(data)
    return _clean(data)


def headline(d: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict on the written model, from a report's figures (`report_dict`).

    With a lossy stage the written model is the stage's: the verdict is its held-out check
    against the original within the stage's budget (`ok` None when it was not checked); the
    lossless stage's parity is only how the stage's starting point was checked. Without one,
    the verdict is the parity check. Keys: `model` ("lossy" or "lossless"), `stage`, `ok`,
    `status` (a word for the headline), and the figures it rests on.
    """
    quant = d.get("quantization")
    parity = d["parity"]
    if quant is None:
        if not parity["checked"]:
            status, ok = "not checked", None
        elif not parity["verified"]:
            status, ok = "not verified", None
        else:
            status, ok = ("ok", True) if parity["passed"] else ("FAILED", False)
        rel = [o.get("max_rel") for o in parity.get("outputs", [])]
        finite = [float(v) for v in rel if isinstance(v, (int, float))]
        worst = math.inf if any(v in ("inf", "nan") for v in rel) else max(finite, default=None)
        return {
            "model": "lossless",
            "stage": None,
            "status": status,
            "ok": ok,
            "max_rel_error": worst,
            "rtol": parity.get("rtol"),
        }
    check = quant.get("held_out_check")
    budget = quant["budget"]["max_error"]
    data: dict[str, Any] = {
        "model": "lossy",
        "stage": quant["stage"],
        "budget": budget,
        "calibration_error": quant["budget"]["final_error"],
        "error": None,
        "held_out": None,
        "source": None,
        "samples": None,
        "min_cosine": None,
        "metric": None,
        "metric_value": None,
    }
    if check is None:
        return {**data, "status": "not checked", "ok": None, "reason": "--no-verify"}
    if not check["verified"]:
        return {**data, "status": "not checked", "ok": None, "reason": check["reason"]}
    error = check["error"]
    within = (
        isinstance(error, (int, float)) and isinstance(budget, (int, float)) and error <= budget
    )
    cosines = [o["cosine"] for o in check["outputs"] if isinstance(o.get("cosine"), (int, float))]
    return {
        **data,
        "status": "within budget" if within else "OVER budget",
        "ok": within,
        "error": error,
        "held_out": check["held_out"],
        "source": check["source"],
        "samples": check["samples"],
        "min_cosine": min(cosines, default=None),
        "metric": check.get("metric"),
        "metric_value": check.get("metric_value"),
    }


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

    Read duck-typed from `onnxshrink.quant.lossy.StageResult` and `HeldOutCheck` (attributes or
    keys).
    """
    if quant is None:
        return None
    budget = _get(quant, "budget")
    qreport = _get(quant, "quantize")
    layers = [_layer_dict(layer) for layer in _get(quant, "layers", []) or []]
    kept = [layer for layer in layers if layer["precision"] == "float"]
    data: dict[str, Any] = {
        "stage": _get(quant, "stage") or "int8",
        "family": _get(quant, "family") or "quantization",
        "kept_as": _get(quant, "kept_as") or "float",
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
                "float_apart": _get(speed, "float_apart"),
                "input_shapes": _get(speed, "input_shapes"),
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


def _model_name(model_path: Any, result: Any) -> str:
    if model_path is not None:
        return Path(model_path).name
    graph_name = getattr(getattr(getattr(result, "model", None), "graph", None), "name", "")
    return graph_name or "model"


def figures(
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
