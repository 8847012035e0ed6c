"""Static int8 quantization end to end: calibration data in, a QDQ model and its account out.

`quantize_int8(model, calibration, ...)` is what `onnxshrink optimize --quantize int8` runs on
the model the lossless rules produced (BatchNorm already folded, so weights are quantized in
their final form). Pipeline:

0. The model is prepared once (`quantize.prepare_model`: nodes named, opset raised to 13 when
   a per-channel DequantizeLinear needs it), so that no candidate of the budget search pays
   for a copy-and-convert of its own.
1. Calibration feeds: `calibration.calibration_feeds(spec, model)` for a spec (an .npz, a folder
   of them, `loader.py[:function]`, or `random`); a list of feed dicts is used as given. Every
   source is cut into runs of at most `calibration_batch` samples and streamed, so memory
   does not depend on the number of samples. `random` is marked synthetic, and the result
   says so.
2. Tensors to calibrate: `quantize.activation_tensors(model, target, exclude=...)`: the inputs of
   the quantizable Conv/ConvTranspose/Gemm/MatMul nodes, and on `ort-cpu` their outputs.
3. Statistics: `calibration.collect_statistics` in one streaming ORT pass over the feeds
   (`method`, `provider`; symmetric |x| statistics for `tensorrt`, whose activations are
   symmetric int8): each tensor's range, and the per-channel means of the inputs of Conv and
   Gemm nodes, for bias correction (`quantize.quantize_qdq`, case 7). The same pass keeps the
   float model's outputs on the first `DEFAULT_SAMPLES` samples: the budget's reference, so
   the float model is never run again for it.
4. Placement within the error budget: `sensitivity.quantize_with_budget` quantizes everything
   eligible, and when the error figure (`onnxshrink.measure`) on the first calibration
   samples exceeds `max_error`, keeps the most sensitive layers float until it holds.
5. Speed-aware placement (`ort-cpu`, `check_speed`). int8 kernels pay off only where the
   arithmetic they save outweighs the Q/DQ conversions around them; on small tensors (a text
   classifier at 48x192) they may not. So a second candidate is built: every layer computes
   in float, MatMul/Gemm weights stored int8 (`quantize.quantize_qdq` case 6, with bias
   correction; the only weight-only storage that costs no speed), and its output error is
   measured like the others. The float model, the int8 one and this one are timed on ORT CPU
   in `SPEED_RUNS` interleaved runs on one calibration sample (medians; intra-op spinning
   off so that one session's idle threads do not slow the next). The float-compute candidate
   replaces int8 compute when it is faster by more than `SPEED_MARGIN` (10%) and within the
   error budget, with a note giving the figures. Otherwise int8 compute stays: it is the
   smaller file, and a smaller lead is within what two medians of 20 runs on a busy machine
   can disagree by (on the zoo's recognizers the two were within 1-4% and swapped places
   between runs of the bench).
   A warning note says when the result is still slower than the float model.
6. The account (`onnxshrink.lossy.StageResult`): settings, number of feeds seen, calibration time, the budget and
   quantize reports, the speed check, and `layers`: every Conv/ConvTranspose/Gemm/MatMul with
   "int8" or "float" and why.

`held_out_check` then judges a quantized model against the original on other feeds (held-out
data, never the calibration samples): per output cosine and SNR (pooled over runs), the
budget's own figure (`onnxshrink.measure`: the noise-to-signal ratio of the worst channel
group, so that a small-valued part of an output counts as much as a large one), argmax
agreement where `onnxshrink.parity` computes it, and the mean of a user's task metric
(`--metric`) over the batches.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.calibration import (
    DEFAULT_BATCH,
    METHODS,
    CalibrationData,
    collect_statistics,
)
from onnxshrink.errors import UsageError
from onnxshrink.lossy import (
    LayerDecision,
    SpeedCheck,
    StagedProgress,
    StageResult,
    StageSettings,
    _Counted,
    as_calibration_data,
    speed_check,
)
from onnxshrink.parity import declared_batches, split_feed
from onnxshrink.quantize import (
    QuantizeReport,
    activation_tensors,
    bias_correction_axes,
    prepare_model,
    quantizable_nodes,
    quantize_qdq,
)
from onnxshrink.sensitivity import (
    DEFAULT_MAX_ERROR,
    DEFAULT_SAMPLES,
    BudgetReport,
    ErrorReference,
    quantize_with_budget,
)
from onnxshrink.targets import target_profile

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

PROVIDERS = ("cpu", "cuda")
#: the lead float compute needs over int8 compute to replace it (module docstring, 5), and
#: the slowdown against the float model warned about
SPEED_MARGIN = 0.10
SPEED_WARN_RATIO = 1.03


def check_settings(
    *,
    method: str = "percentile",
    target: str = "ort-cpu",
    exclude: Sequence[str] = (),
    max_error: float = DEFAULT_MAX_ERROR,
    provider: str = "cpu",
) -> None:
    """Raise UsageError (one line) for a bad method, target, regex, budget or provider."""
    if method not in METHODS:
        raise UsageError(f"--calibration-method {method!r}: expected one of {', '.join(METHODS)}")
    target_profile(target)  # UsageError for an unknown target
    if provider not in PROVIDERS:
        raise UsageError(
            f"--calibration-provider {provider!r}: expected one of {', '.join(PROVIDERS)}"
        )
    for text in exclude:
        try:
            re.compile(text)
        except re.error as exc:
            raise UsageError(f"--exclude {text!r} is not a valid regex: {exc}") from None
    if not (isinstance(max_error, (int, float)) and math.isfinite(max_error) and max_error >= 0):
        raise UsageError(f"--max-error {max_error}: must be a finite number >= 0")


def quantize_int8(
    model: onnx.ModelProto,
    calibration: str | Path | CalibrationData | Iterable[Mapping[str, np.ndarray]],
    *,
    method: str = "percentile",
    target: str = "ort-cpu",
    exclude: Sequence[str] = (),
    max_error: float = DEFAULT_MAX_ERROR,
    provider: str = "cpu",
    progress: StagedProgress | None = None,
    check_speed: bool = True,
    bias_correction: bool = True,
    calibration_batch: int = DEFAULT_BATCH,
) -> StageResult:
    """Quantize a float model to QDQ int8 within an output error budget; `model` is kept.

    `calibration`: an .npz path, a folder of them, `loader.py[:function]`, `random`, a
    `CalibrationData`, or a list of feed dicts. `exclude`: regexes; a node stays float when one
    is found in its name or matches its op type. `max_error`: the mean output noise-to-signal
    ratio allowed on calibration feeds (see `onnxshrink.sensitivity`). `progress(stage, done,
    total)` reports the calibration pass and the sensitivity sessions. `check_speed` times the
    result against `model` on `ort-cpu` (module docstring, 5); `bias_correction` folds the
    mean shift of rounded weights into biases (module docstring, 3). Raises UsageError for bad
    settings or data (one line).
    """
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    check_settings(
        method=method, target=target, exclude=exclude, max_error=max_error, provider=provider
    )
    profile = target_profile(target)
    # named and at opset >= 13 once, not once per candidate the budget search builds
    model, opset_before = prepare_model(model)
    data = as_calibration_data(calibration, model, calibration_batch)  # 1
    names = activation_tensors(model, target, exclude=exclude)  # 2
    counted = _Counted(data)
    timings: dict[str, float] = {}

    def stage(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(name, done, total)

    start = time.perf_counter()
    mean_axes = bias_correction_axes(model, target, exclude=exclude) if bias_correction else {}
    # the budget's reference: the float outputs on the first samples, kept from this pass
    reference = ErrorReference(model, DEFAULT_SAMPLES)
    stats = collect_statistics(  # 3
        model,
        names,
        counted,
        method=method,
        provider=provider,
        progress=stage("calibration"),
        symmetric=profile.symmetric_activations,
        mean_axes=mean_axes,
        on_run=reference.record,
    )
    reference.check()
    ranges = stats.ranges
    seconds = timings["statistics"] = time.perf_counter() - start
    logger.info(
        "calibration: %d tensor(s) from %d run(s) of %s in %.2f s",
        len(ranges),
        counted.count,
        data.source,
        seconds,
    )
    means = stats.channel_means if bias_correction else None
    phase = time.perf_counter()
    quantized, budget = quantize_with_budget(  # 4
        model,
        ranges,
        data,
        target,
        max_error,
        exclude,
        progress=stage("sensitivity"),
        input_means=means,
        reference=reference,
    )
    report = budget.quantize
    assert report is not None  # quantize_with_budget always sets it
    timings["sensitivity"] = time.perf_counter() - phase
    logger.info("sensitivity: %d session(s) in %.2f s", budget.sessions, timings["sensitivity"])
    speed = None
    if check_speed and profile.speed_check and report.quantized:  # 5
        phase = time.perf_counter()
        quantized, report, speed = _speed_aware(
            model, quantized, report, budget, ranges, exclude, means, reference, max_error
        )
        timings["speed check"] = time.perf_counter() - phase
        logger.info("speed check: %.2f s", timings["speed check"])
    report.opset_before = opset_before
    if report.opset_changed:
        report.notes.insert(
            0,
            f"converted from opset {opset_before} to {report.opset_after}: per-channel "
            "DequantizeLinear needs its axis attribute",
        )
    return StageResult(
        stage="int8",
        model=quantized,
        target=target,
        calibration=data.source,
        feeds=counted.count,
        synthetic=bool(data.synthetic),
        budget=budget,
        layers=layer_decisions(model, target, report, budget),
        timings=timings,
        samples=data.samples,
        batch=calibration_batch,
        notes=report.notes,
        method=method,
        seconds=seconds,
        quantize=report,
        speed=speed,
    )


class Int8Stage:
    """`--quantize int8` as a lossy stage (`onnxshrink.lossy`): `quantize_int8` with the
    user's settings."""

    name = "int8"
    summary = "static int8 (QDQ) with calibration, within the error budget"

    def run(
        self,
        model: onnx.ModelProto,
        calibration: str | Path | CalibrationData | Iterable[Mapping[str, np.ndarray]],
        settings: StageSettings,
    ) -> StageResult:
        return quantize_int8(
            model,
            calibration,
            method=settings.method,
            target=settings.target,
            exclude=settings.exclude,
            max_error=settings.max_error,
            provider=settings.provider,
            progress=settings.progress,
            check_speed=settings.check_speed,
            calibration_batch=settings.calibration_batch,
        )


STAGE = Int8Stage()


def _speed_aware(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    report: QuantizeReport,
    budget: BudgetReport,
    ranges: dict[str, tuple[float, float]],
    exclude: Sequence[str],
    means: Mapping[str, np.ndarray] | None,
    reference: ErrorReference,
    max_error: float,
) -> tuple[onnx.ModelProto, QuantizeReport, SpeedCheck]:
    """Module docstring 5: int8 compute, or float compute with int8 weights, by measurement."""
    # int8 storage only where it costs no speed: MatMul/Gemm (a Conv whose weight goes through
    # a DQ loses ORT's NCHWc kernels; quantize.py case 6)
    storable = {
        c.name
        for c in quantizable_nodes(model, "ort-cpu", exclude=exclude)
        if c.op in ("MatMul", "Gemm") and (c.quantizable or c.weight_only_ok)
    }
    weights, weights_report = quantize_qdq(
        model, ranges, exclude=exclude, nodes=set(), weight_only=storable, input_means=means
    )
    weights_error = reference.error(weights, "the float-compute candidate")
    budget.sessions += 1
    within = weights_error <= max_error  # over budget, it is not a candidate (not timed)
    # one sample, the latency a deployment runs at (the budget's feeds may hold several)
    feed = next(split_feed(reference.feeds[0], declared_batches(model), 1))
    speed = speed_check(model, quantized, feed, weights_model=weights if within else None)
    logger.info(
        "speed: float %.2f ms, int8 %.2f ms, float compute with int8 weights %s ms",
        speed.float_ms,
        speed.int8_ms,
        "-" if speed.weights_ms is None else f"{speed.weights_ms:.2f}",
    )
    if speed.weights_ms is not None and speed.weights_ms < (1.0 - SPEED_MARGIN) * speed.int8_ms:
        speed = SpeedCheck(speed.float_ms, speed.int8_ms, speed.runs, speed.weights_ms, "weights")
        for name in report.quantized:
            weights_report.kept_float[name] = "int8 compute not faster here (speed check)"
        weights_report.notes.extend(n for n in report.notes if n not in weights_report.notes)
        weights_report.notes.append(
            f"speed check: int8 compute ran {speed.int8_ms:.2f} ms, float compute with int8 "
            f"weights {speed.weights_ms:.2f} ms, the float model {speed.float_ms:.2f} ms "
            f"(median of {speed.runs} interleaved runs): int8 kernels do not pay off at these "
            f"tensor sizes, so every layer computes in float and {len(weights_report.weight_only)}"
            " MatMul/Gemm layer(s) store int8 weights (--no-speed-check keeps int8 compute)"
        )
        # the budget report now describes the returned model: its error, nothing kept for it
        budget.final_error = weights_error
        budget.kept_float = {}
        quantized, report = weights, weights_report
    if speed.ratio > SPEED_WARN_RATIO:
        report.notes.append(
            f"warning: the result runs {speed.ratio:.2f}x the time of the float model on this "
            f"machine ({speed.result_ms:.2f} vs {speed.float_ms:.2f} ms, median of {speed.runs} "
            "interleaved runs); without --quantize the result is faster"
        )
    return quantized, report, speed


def layer_decisions(
    model: onnx.ModelProto, target: str, report: QuantizeReport, budget: BudgetReport
) -> list[LayerDecision]:
    """Every Conv/ConvTranspose/Gemm/MatMul in graph order, "int8" or "float" with its reason."""
    alone = {e.name: e.error for e in budget.ranking}
    quantized = set(report.quantized)
    weight_only = set(report.weight_only)
    layers = []
    for cand in quantizable_nodes(model, target):
        if cand.name in quantized:
            layers.append(LayerDecision(cand.name, cand.op, "int8", None, alone.get(cand.name)))
        else:
            reason = report.kept_float.get(cand.name) or cand.reason or "not quantized"
            if cand.name in weight_only:
                reason += "; weight stored int8"
            layers.append(LayerDecision(cand.name, cand.op, "float", reason, alone.get(cand.name)))
    return layers
