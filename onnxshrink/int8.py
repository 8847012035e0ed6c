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
6. The account (`Int8Result`): settings, number of feeds seen, calibration time, the budget and
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.calibration import (
    DEFAULT_BATCH,
    METHODS,
    CalibrationData,
    calibration_feeds,
    collect_statistics,
)
from onnxshrink.errors import UsageError
from onnxshrink.measure import OutputNoise, TaskMetric
from onnxshrink.parity import (
    Reference,
    check_parity,
    declared_batches,
    feed_samples,
    split_feed,
)
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

#: progress(stage, done, total): stage is "calibration" or "sensitivity"; total 0 when unknown
StagedProgress = Callable[[str, int, int], None]
Feed = dict[str, np.ndarray]

PROVIDERS = ("cpu", "cuda")
#: timed runs per model in the speed check (module docstring, 5), the lead float compute needs
#: over int8 compute to replace it, and the slowdown against the float model warned about
SPEED_RUNS = 20
SPEED_MARGIN = 0.10
SPEED_WARN_RATIO = 1.03
HOW_TO_CALIBRATE = "--calibration-data calib.npz | folder | loader.py[:fn] | random"


@dataclass(frozen=True)
class LayerDecision:
    """One Conv/ConvTranspose/Gemm/MatMul: quantized or kept float, and why.

    `error` is the output NSR with this layer quantized alone, when the sensitivity ranking ran.
    """

    name: str
    op: str
    precision: str  # "int8" or "float"
    reason: str | None = None
    error: float | None = None


@dataclass
class Int8Result:
    """What `quantize_int8` did (module docstring, 5)."""

    model: onnx.ModelProto
    target: str
    method: str
    calibration: str
    feeds: int
    synthetic: bool
    seconds: float
    budget: BudgetReport
    quantize: QuantizeReport
    layers: list[LayerDecision] = field(default_factory=list)
    speed: SpeedCheck | None = None
    #: seconds per phase: "statistics", "sensitivity", "speed check" (when it ran)
    timings: dict[str, float] = field(default_factory=dict)
    #: calibration samples (0 when the source did not say) and the run size they were cut to
    samples: int = 0
    batch: int = DEFAULT_BATCH

    @property
    def quantized(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.precision == "int8"]

    @property
    def kept_float(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.precision == "float"]


@dataclass(frozen=True)
class SpeedCheck:
    """Median ms per run on ORT CPU (module docstring, 5): the float model, int8 compute, and
    float compute with int8 weights (None when there was no such candidate); `chosen` is
    "int8" or "weights".
    """

    float_ms: float
    int8_ms: float
    runs: int
    weights_ms: float | None = None
    chosen: str = "int8"

    @property
    def result_ms(self) -> float:
        return self.weights_ms if self.chosen == "weights" and self.weights_ms else self.int8_ms

    @property
    def ratio(self) -> float:
        """The result's time over the float model's."""
        return self.result_ms / self.float_ms if self.float_ms > 0 else math.inf


@dataclass(frozen=True)
class OutputError:
    """Held-out figures of one output: quantized model against the original."""

    name: str
    cosine: float
    snr_db: float
    nsr: float
    argmax_agreement: float | None = None
    floating: bool = True


@dataclass
class HeldOutCheck:
    """`held_out_check`'s result. `error` is the budget's figure: the worst float output's
    per-group NSR (`onnxshrink.measure`).

    `held_out` is False when the feeds were generated or are the calibration data itself;
    `source` says where they came from. `verified` is False when a model could not run (then
    `reason` says why and there are no figures).
    """

    samples: int
    source: str
    held_out: bool
    verified: bool = True
    reason: str | None = None
    outputs: list[OutputError] = field(default_factory=list)
    error: float = 0.0
    #: the user's task metric (`--metric`) and its mean over the held-out batches
    metric: str | None = None
    metric_value: float | None = None


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


def as_calibration_data(
    calibration: str | Path | CalibrationData | Iterable[Mapping[str, np.ndarray]],
    model: onnx.ModelProto,
    max_batch: int = DEFAULT_BATCH,
) -> CalibrationData:
    """The feeds of `calibration` (module docstring, 1); UsageError saying how to give them.

    Every source is cut into runs of at most `max_batch` samples where the model's batch dim
    is dynamic (`calibration.calibration_feeds`); a `CalibrationData` is used as it is.
    """
    if isinstance(calibration, CalibrationData):
        return calibration
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise UsageError(f"--calibration-batch {max_batch}: must be at least 1")
    if isinstance(calibration, (str, Path)):
        return calibration_feeds(calibration, model, max_batch=max_batch)
    if calibration is None:
        raise UsageError(f"int8 quantization needs calibration data: {HOW_TO_CALIBRATE}")
    declared = declared_batches(model)
    feeds = [run for feed in calibration for run in split_feed(dict(feed), declared, max_batch)]
    if not feeds:
        raise UsageError(f"calibration data holds no feeds: {HOW_TO_CALIBRATE}")
    samples = sum(feed_samples(f, declared) for f in feeds)
    return CalibrationData("feeds", lambda: iter(feeds), len(feeds), samples=samples)


class _Counted:
    """Iterates `data` and remembers how many feeds the last pass yielded."""

    def __init__(self, data: CalibrationData) -> None:
        self.data = data
        self.count = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Feed]:
        self.count = 0
        for feed in self.data:
            self.count += 1
            yield feed


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
) -> Int8Result:
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
    return Int8Result(
        model=quantized,
        target=target,
        method=method,
        calibration=data.source,
        feeds=counted.count,
        synthetic=bool(data.synthetic),
        seconds=seconds,
        budget=budget,
        quantize=report,
        layers=layer_decisions(model, target, report, budget),
        speed=speed,
        timings=timings,
        samples=data.samples,
        batch=calibration_batch,
    )


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


def speed_check(
    float_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    feed: Feed,
    runs: int = SPEED_RUNS,
    *,
    weights_model: onnx.ModelProto | None = None,
) -> SpeedCheck:
    """Median ms per run of the models on ORT CPU, interleaved (module docstring, 5)."""
    import onnxruntime as ort

    def session(model: onnx.ModelProto):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    models = [float_model, int8_model] + ([weights_model] if weights_model is not None else [])
    sessions = [session(m) for m in models]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    feeds = [{k: v for k, v in feed.items() if k in n} for n in names]
    times: list[list[float]] = [[] for _ in sessions]
    for s, f in zip(sessions, feeds, strict=True):  # warm-up: first runs allocate
        s.run(None, f)
        s.run(None, f)
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - start) * 1e3)
    medians = [float(np.median(t)) for t in times]
    return SpeedCheck(medians[0], medians[1], runs, medians[2] if len(medians) > 2 else None)


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


def held_out_check(
    reference: Reference | onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Iterable[Feed],
    *,
    source: str,
    held_out: bool,
    float_outputs: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    metric: TaskMetric | None = None,
) -> HeldOutCheck:
    """Judge a quantized model against the original on `feeds` (module docstring).

    `float_outputs` names the outputs that count in the error (default: all); the error is the
    budget's figure (`onnxshrink.measure`: per channel group, worst output). `metric` (a
    user's task metric) is called on every batch and its mean reported. Never raises for ORT
    failures: the check is then unverified, with the reason; a failing metric raises
    UsageError.
    """
    noises: dict[str, OutputNoise] = {}

    def observe(names: list[str], ref: list[np.ndarray], cand: list[np.ndarray]) -> None:
        for name, r, c in zip(names, ref, cand, strict=True):
            if np.issubdtype(np.asarray(r).dtype, np.floating):
                noises.setdefault(name, OutputNoise()).update(r, c)
        if metric is not None:
            metric.update(names, ref, cand)

    parity = check_parity(
        reference,
        candidate,
        feeds,
        progress=progress,
        labels=("original", "quantized"),
        observe=observe,
    )
    check = HeldOutCheck(parity.samples, source, held_out, parity.verified, parity.reason)
    if not parity.verified or not parity.outputs:
        check.verified = False
        check.reason = parity.reason or "no outputs compared"
        return check
    counted = set(float_outputs) if float_outputs is not None else None
    errors = []
    for o in parity.outputs:
        floating = (counted is None or o.name in counted) and o.name in noises
        nsr = noises[o.name].value() if o.name in noises else _nsr(o.snr_db)
        check.outputs.append(
            OutputError(o.name, o.cosine, o.snr_db, nsr, o.argmax_agreement, floating)
        )
        if floating:
            errors.append(nsr)
    check.error = max(errors) if errors else 0.0
    if metric is not None:
        check.metric, check.metric_value = metric.spec, metric.value
    return check


def _nsr(snr_db: float) -> float:
    """sum (q - f)^2 / sum f^2 from SNR dB = 10 log10(sum f^2 / sum (q - f)^2)."""
    if math.isinf(snr_db):
        return 0.0 if snr_db > 0 else math.inf
    if math.isnan(snr_db):
        return math.nan
    return 10.0 ** (-snr_db / 10.0)


def float_output_names(model: onnx.ModelProto) -> list[str]:
    """Names of the graph outputs whose declared type is floating point."""
    floating = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
    return [
        o.name
        for o in model.graph.output
        if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in floating
    ]
