"""The int8 stage: calibration data in, a QDQ model and its account out.

`quantize_int8(model, calibration, ...)` is what `onnxshrink optimize --quantize int8` runs on
the model the lossless rules produced (BatchNorm already folded, so weights are quantized in
their final form); `STAGE` is its entry in `onnxshrink.rules.LOSSY_STAGES`. The QDQ rewrite
itself (which nodes, which schemes, the Q/DQ placement, bias correction) is `rules/qdq.py`;
calibration, the error figure, the budget search and the checks are the engine's. Pipeline:

0. The model is prepared once (`qdq.prepare_model`: nodes named, opset raised to 13 when
   a per-channel DequantizeLinear needs it), so that no candidate of the budget search pays
   for a copy-and-convert of its own.
1. Calibration feeds: `calibration.calibration_feeds(spec, model)` for a spec (an .npz, a folder
   of them, `loader.py[:function]`, or `random`); a list of feed dicts is used as given. Every
   source is cut into runs of at most `calibration_batch` samples and streamed, so memory
   does not depend on the number of samples. `random` is marked synthetic, and the result
   says so.
2. Tensors to calibrate: `qdq.activation_tensors(model, target, exclude=...)`: the inputs of
   the quantizable Conv/ConvTranspose/Gemm/MatMul nodes, and on `ort-cpu` the outputs of
   the Conv/ConvTranspose/Gemm ones.
3. Statistics: `calibration.collect_statistics` in one streaming ORT pass over the feeds
   (`method`, `provider`; symmetric |x| statistics for `tensorrt`, whose activations are
   symmetric int8): each tensor's range, and the per-channel means of the inputs of Conv and
   Gemm nodes, for bias correction (`qdq.quantize_qdq`, case 7). The same pass keeps the
   float model's outputs on the first `DEFAULT_SAMPLES` samples: the budget's reference, so
   the float model is never run again for it.
   a. It also keeps the per-channel range of every activation that int8 MatMuls read and that
      smoothing can rescale (`smooth_matmul.smoothable_tensors`, other readers allowed: they
      keep reading the unscaled tensor).
   b. Targets that store weights int8 (`ort-cpu`, `ort-cuda`) store large Gather tables
      (embeddings) int8 per row (`quantize_gather`), in every candidate the budget measures.
   c. Smoothing (SmoothQuant). A transformer's MatMul inputs have a few channels far larger
      than the rest (LayerNorm outputs reach [-14, 29] in all-MiniLM-L6-v2), so one
      per-tensor scale leaves the others a handful of int8 steps. `smooth_matmuls` divides each
      channel by `s_c = max|x_c|^alpha / max|W_c|^(1 - alpha)` and multiplies the weight rows
      by it (exact in float). The range of each smoothed tensor follows from 3a without a
      second pass. Smoothing is for outlier channels, so it is tried only when some channel's
      magnitude is `SMOOTHING_OUTLIER` (8) times its tensor's median channel's (measured: up
      to 25x on all-MiniLM-L6-v2, at most 4.7x and 6.8x on the PP-OCR v4 and v5
      recognizers, which skip the three extra sessions). Then the fully quantized model is
      measured without smoothing and with each alpha of `SMOOTHING_ALPHAS`, and the least
      error wins: on all-MiniLM-L6-v2, alpha 0.7 took the held-out embedding cosine from
      0.9935 to 0.998 at the same speed.
4. Placement within the error budget: `quantize_with_budget` quantizes everything
   eligible, and when the error figure (`onnxshrink.verify.measure`) on the first calibration
   samples exceeds `max_error`, keeps the most sensitive layers float until it holds.
5. Speed-aware placement (`ort-cpu`, `check_speed`). int8 kernels pay off only where the
   arithmetic they save outweighs the Q/DQ conversions around them; on small tensors (a text
   classifier at 48x192) they may not. So a second candidate is built: every layer computes
   in float, MatMul/Gemm weights stored int8 (`qdq.quantize_qdq` case 6, with bias
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
6. The account (`onnxshrink.quant.lossy.StageResult`): settings, feeds seen, the time of each
   phase, the budget and QDQ reports, the speed check, and `layers`: every
   Conv/ConvTranspose/Gemm/MatMul with "int8" or "float" and why. `optimize` then judges the
   result on held-out data (`onnxshrink.quant.lossy.held_out_check`).

Placement within the budget (step 4; `onnxshrink.quant.budget` does the searching):

a. Ranking (`layer_sensitivity`, with `onnxshrink.quant.budget.rank`). For each quantizable node
   (`qdq.quantizable_nodes` with no reason, and a calibrated range for its input), the model
   with that node alone quantized (`quantize_qdq(nodes={name})`) is measured: one ORT session
   per node. Sorted by error, largest first (ties by graph order).
b. Budget (`quantize_with_budget`). Everything eligible is quantized and measured. When the
   error exceeds `max_error`, the k most sensitive nodes of the ranking stay float, with the
   least k found by `onnxshrink.quant.budget.decline_fewest` (galloping, then bisection; about
   2 log2(N) sessions); when even k = N fails, nothing is quantized.
c. Weight-only storage (not `tensorrt`; `qdq` case 6). Nodes float for structural reasons
   (no calibrated range, ...) store int8 weights in every step, so their rounding error is
   inside every measured figure. Of the k nodes kept float for sensitivity, those that can
   store int8 weights are sorted by weight size, largest first, and the longest prefix whose
   int8 storage still meets the budget is found by `onnxshrink.quant.budget.grant_most` (all of
   them first: one session when it passes, about log2(k) more when not); the others stay
   entirely float. This is what makes the file small when the largest layer (often a
   classifier) is sensitive to activation quantization but not to weight rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxshrink.engine.io import SESSION_FILE_BYTES, array_of, model_bytes, release_memory
from onnxshrink.errors import UsageError
from onnxshrink.quant.budget import decline_fewest, grant_most, rank
from onnxshrink.quant.calibration import (
    DEFAULT_BATCH,
    collect_statistics,
)
from onnxshrink.quant.lossy import (
    SPEED_RUNS,
    CalibrationSource,
    LayerDecision,
    Plan,
    SpeedCheck,
    StagedProgress,
    StageResult,
    StageSettings,
    _Counted,
    as_calibration_data,
    check_settings,
    interleaved_ms,
    mask_notes,
    speed_check,
)
from onnxshrink.quant.sensitivity import (
    DEFAULT_MAX_ERROR,
    DEFAULT_SAMPLES,
    RANKING_SAMPLES,
    BudgetReport,
    ErrorReference,
    LayerError,
)
from onnxshrink.quant.targets import TargetProfile, target_profile
from onnxshrink.rules.qdq import (
    QuantizeReport,
    activation_tensors,
    bias_correction_axes,
    prepare_model,
    quantizable_nodes,
    quantize_qdq,
)
from onnxshrink.rules.quantize_gather import quantize_gather_tables
from onnxshrink.rules.smooth_matmul import smooth_matmuls, smoothable_tensors
from onnxshrink.verify.measure import mask_input as find_mask_input
from onnxshrink.verify.parity import declared_batches, split_feed

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Progress = Callable[[int, int], None]

#: smoothing strengths tried (module docstring, 3c): 0 is none, 1 moves all the range to weights
SMOOTHING_ALPHAS = (0.5, 0.7, 0.85)
#: smoothing is tried only when a channel is this many times its tensor's median channel (3c)
SMOOTHING_OUTLIER = 8.0
#: the lead float compute needs over int8 compute to replace it (module docstring, 5), and
#: the slowdown against the float model warned about
SPEED_MARGIN = 0.10
SPEED_WARN_RATIO = 1.03


def eligible_nodes(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    target: str = "ort-cpu",
    exclude: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """(name, op) of the nodes `quantize_qdq` would quantize with these ranges, graph order."""
    return [
        (c.name, c.op)
        for c in quantizable_nodes(model, target, exclude=exclude)
        if c.quantizable and c.activation in ranges
    ]


def layer_sensitivity(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    feeds: Iterable[Feed],
    target: str = "ort-cpu",
    samples: int = DEFAULT_SAMPLES,
    *,
    exclude: Sequence[str] = (),
    progress: Progress | None = None,
    input_means: Mapping[str, np.ndarray] | None = None,
    workers: int = 1,
    _reference: ErrorReference | None = None,
) -> list[LayerError]:
    """Each eligible node's output error when quantized alone, largest first (docstring 2).

    `feeds` is iterated once (its first `samples` feeds); one ORT session per node plus one
    for the float model. `workers` > 1 measures the nodes in that many processes
    (`onnxshrink.quant.fanout`), with the same ranking. Raises UsageError when the model has
    no float output or no feeds.
    """
    reference = _reference or ErrorReference.from_model(model, feeds, samples)
    nodes = eligible_nodes(model, ranges, target, exclude)
    ops = dict(nodes)
    alone = _QuantizedAlone(model, ranges, target, input_means, reference)
    ranked = [
        LayerError(name, ops[name], error)
        for name, error in rank([n for n, _ in nodes], alone, progress, workers)
    ]
    if ranked:
        logger.info(
            "sensitivity of %d node(s): most sensitive %s (%.3g)",
            len(ranked),
            ranked[0].name,
            ranked[0].error,
        )
    return ranked


@dataclasses.dataclass(frozen=True)
class _QuantizedAlone:
    """One node's ranking measurement: the model with that node alone quantized (the others
    entirely float), its error on the reference. Picklable: sent once to each search worker."""

    model: onnx.ModelProto
    ranges: dict[str, tuple[float, float]]
    target: str
    input_means: Mapping[str, np.ndarray] | None
    reference: ErrorReference

    def __call__(self, name: str) -> float:
        single, _ = quantize_qdq(
            self.model,
            self.ranges,
            target=self.target,
            nodes={name},
            weight_only=False,
            input_means=self.input_means,
        )
        return self.reference.error(single, f"{name} quantized alone", RANKING_SAMPLES)


def quantize_with_budget(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    feeds: Iterable[Feed],
    target: str = "ort-cpu",
    max_error: float = DEFAULT_MAX_ERROR,
    exclude: Sequence[str] = (),
    *,
    samples: int = DEFAULT_SAMPLES,
    ranking: list[LayerError] | None = None,
    progress: Progress | None = None,
    weight_only: bool | None = None,
    input_means: Mapping[str, np.ndarray] | None = None,
    reference: ErrorReference | None = None,
    workers: int = 1,
) -> tuple[onnx.ModelProto, BudgetReport]:
    """Quantize every eligible node, then keep the most sensitive in float until error <= budget.

    Returns the QDQ model and a BudgetReport (its `quantize` is quantize_qdq's report of the
    returned model). `ranking` (from `layer_sensitivity` on the same model, ranges and target)
    skips the ranking; otherwise it is computed only when the fully quantized model is over
    budget. `feeds` is iterated once. `weight_only` (default: on but for `tensorrt`) stores int8
    weights for nodes kept float (quantize_qdq case 6) where the budget allows; `input_means`
    turns on bias correction (quantize_qdq case 7) in every candidate measured; `reference`
    (an `ErrorReference` of the same model) reuses cached float outputs instead of `feeds`;
    `workers` > 1 measures the ranking in that many processes (`layer_sensitivity`). Raises
    UsageError for a negative or non-finite budget.
    """
    if not (max_error >= 0.0 and math.isfinite(max_error)):
        raise UsageError(f"--max-error {max_error}: must be a finite number >= 0")
    reference = reference or ErrorReference.from_model(model, feeds, samples)
    report = BudgetReport(max_error=max_error)
    if weight_only is None:
        weight_only = target in ("ort-cpu", "ort-cuda")

    # every Conv/Gemm/MatMul name (unnamed ones as quantize_qdq names them): leaving a node out
    # of `nodes` keeps it float while the other nodes keep their own reasons
    candidates = quantizable_nodes(model, target, exclude=exclude)
    everything = {c.name for c in candidates}
    # nodes float for structural reasons (depthwise, ...) store int8 weights in every step
    # (docstring 5); nodes kept for sensitivity only when the last step says they may
    base_weight_only = (
        {c.name for c in candidates if c.weight_only_ok and not c.quantizable}
        if weight_only
        else set()
    )
    initializers = {t.name: t for t in model.graph.initializer}
    weight_sizes = {  # nodes whose weight could be stored int8 if kept float
        c.name: int(np.prod(initializers[c.weight].dims))
        for c in candidates
        if c.weight_only_ok and c.weight in initializers
    }
    errors: dict[str, float] = {}

    def build(
        kept: Sequence[str], stored: Collection[str] = ()
    ) -> tuple[onnx.ModelProto, QuantizeReport]:
        chosen = base_weight_only | set(stored)
        built, qreport = quantize_qdq(
            model,
            ranges,
            target=target,
            exclude=exclude,
            nodes=everything - set(kept),
            weight_only=chosen,
            input_means=input_means,
        )
        for name in kept:
            qreport.kept_float[name] = f"sensitive: error {errors[name]:.3g} quantized alone"
        return built, qreport

    def record(k: int, error: float) -> float:
        report.sessions += 1
        report.steps.append((k, error))
        logger.info("%d most sensitive node(s) float: error %.4g", k, error)
        return error

    def measure(k: int, ranked: Sequence[LayerError]) -> tuple[onnx.ModelProto, QuantizeReport]:
        built, qreport = build([e.name for e in ranked[:k]])
        record(k, reference.error(built, f"quantized model with {k} node(s) kept float"))
        return built, qreport

    qmodel, qreport = measure(0, [])
    report.full_error = report.final_error = report.steps[-1][1]
    if report.full_error > max_error:
        ranked = ranking
        if ranked is None:
            ranked = layer_sensitivity(
                model,
                ranges,
                (),
                target,
                samples,
                exclude=exclude,
                progress=progress,
                input_means=input_means,
                workers=workers,
                _reference=reference,
            )
            report.sessions += len(ranked)
        report.ranking = list(ranked)
        errors.update((e.name, e.error) for e in ranked)
        names = [e.name for e in ranked]
        built_reports: dict[int, QuantizeReport] = {}

        def build_declined(kept: Sequence[str]) -> onnx.ModelProto:
            built, step_report = build(kept)
            built_reports[id(built)] = step_report
            return built

        def measured(built: onnx.ModelProto, k: int) -> float:
            return record(k, reference.error(built, f"quantized model with {k} node(s) float"))

        search = decline_fewest(names, build_declined, measured, max_error)  # docstring 3
        if search.built is not None:
            qmodel, qreport = search.built, built_reports[id(search.built)]
            report.final_error = search.error
        else:  # even the structural weight-only nodes cost too much: nothing int8
            qmodel, qreport = quantize_qdq(
                model, ranges, target=target, exclude=exclude, nodes=set(), weight_only=False
            )  # nothing quantized: no rounding, nothing to correct
            for e in ranked:
                qreport.kept_float[e.name] = f"sensitive: error {e.error:.3g} quantized alone"
            report.final_error = 0.0
            report.steps.append((len(ranked), 0.0))
        report.kept_float = {e.name: e.error for e in ranked[: search.k]}
        storable = [n for n in report.kept_float if n in weight_sizes]
        if weight_only and storable and report.final_error > 0.0:
            # docstring 5: int8 storage for the largest kept weights that the budget allows
            storable.sort(key=lambda n: -weight_sizes[n])
            kept = names[: search.k]

            def build_stored(stored: Sequence[str]) -> onnx.ModelProto:
                built, step_report = build(kept, stored)
                built_reports[id(built)] = step_report
                return built

            def measured_stored(built: onnx.ModelProto, j: int) -> float:
                what = f"quantized model with {search.k} node(s) float, {j} storing int8"
                return record(search.k, reference.error(built, what))

            granted = grant_most(storable, build_stored, measured_stored, max_error)
            if granted.built is not None:
                qmodel, qreport = granted.built, built_reports[id(granted.built)]
                report.final_error = granted.error
            report.kept_weights_int8 = storable[: granted.k]
    report.quantize = qreport
    logger.info(
        "error budget %.3g: full int8 %.4g, final %.4g with %d node(s) kept float (%d sessions)",
        max_error,
        report.full_error,
        report.final_error,
        len(report.kept_float),
        report.sessions,
    )
    return qmodel, report


def quantize_int8(
    model: onnx.ModelProto,
    calibration: CalibrationSource,
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
    mask_input: str | None = None,
    smoothing: bool = True,
    calibration_workers: int = 1,
    search_workers: int = 1,
) -> StageResult:
    """Quantize a float model to QDQ int8 within an output error budget; `model` is kept.

    `calibration`: an .npz path, a folder of them, `loader.py[:function]`, `random`, a
    `CalibrationData`, or a list of feed dicts. `exclude`: regexes; a node stays float when one
    is found in its name or matches its op type. `max_error`: the output noise-to-signal
    ratio allowed on calibration feeds (see `onnxshrink.quant.sensitivity`). `progress(stage, done,
    total)` reports the calibration pass and the sensitivity sessions. `check_speed` times the
    result against `model` on `ort-cpu` (module docstring, 5); `bias_correction` folds the
    mean shift of rounded weights into biases (module docstring, 3). `calibration_workers` > 1
    runs the statistics pass on that many shards in worker processes, with the same statistics
    (`onnxshrink.quant.calibration`, 14); `search_workers` > 1 measures the sensitivity ranking
    in that many processes (`onnxshrink.quant.fanout`), with the same ranking. Raises
    UsageError for bad settings or data (one line).
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
    smoothable = _smoothable(model, target, exclude) if smoothing else {}  # 3a
    # the budget's reference: the float outputs on the first samples, kept from this pass
    reference = ErrorReference(model, DEFAULT_SAMPLES)
    reference.mask = find_mask_input(model, mask_input)
    stats = collect_statistics(  # 3
        model,
        names,
        counted if calibration_workers == 1 else data,  # workers re-read an .npz source
        method=method,
        provider=provider,
        progress=stage("calibration"),
        symmetric=profile.symmetric_activations,
        mean_axes=mean_axes,
        channel_ranges=smoothable,
        on_run=reference.record,
        on_run_samples=reference.samples,
        workers=calibration_workers,
    )
    counted.count = stats.runs
    reference.check()
    ranges = stats.ranges
    # A large model's float latency is timed now, while Python holds nothing but the float
    # model: at the speed check it would share memory with the candidates (issue 9, 4).
    float_ms = None
    if check_speed and profile.speed_check and model_bytes(model) > SESSION_FILE_BYTES:
        release_memory()
        float_ms = interleaved_ms([model], _latency_feed(model, reference), SPEED_RUNS)[0]
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
    notes: list[str] = []
    base = model  # what every candidate is built from; `model` stays the float reference
    if profile.weight_only:  # 3b: embedding tables stored int8, in every candidate measured
        base, gathers = quantize_gather_tables(base, exclude=exclude)
        if gathers.quantized:
            notes.append(
                f"{len(gathers.quantized)} Gather table(s) stored int8 per row "
                f"({gathers.bytes_before / 2**20:.1f} MB -> {gathers.bytes_after / 2**20:.1f} MB)"
            )
    smoothing_sessions = 0
    if _has_outlier_channels(stats.channel_ranges):  # 3c
        base, ranges, note, smoothing_sessions = _choose_smoothing(
            base, ranges, stats.channel_ranges, target, exclude, means, reference
        )
        notes.extend(note)
        timings["smoothing"] = time.perf_counter() - phase
    phase = time.perf_counter()
    quantized, budget = quantize_with_budget(  # 4
        base,
        ranges,
        data,
        target,
        max_error,
        exclude,
        progress=stage("sensitivity"),
        input_means=means,
        reference=reference,
        workers=search_workers,
    )
    report = budget.quantize
    assert report is not None  # quantize_with_budget always sets it
    budget.sessions += smoothing_sessions
    report.notes[:0] = notes
    timings["sensitivity"] = time.perf_counter() - phase
    logger.info("sensitivity: %d session(s) in %.2f s", budget.sessions, timings["sensitivity"])
    speed = None
    if check_speed and profile.speed_check and report.quantized:  # 5
        phase = time.perf_counter()
        quantized, report, speed = _speed_aware(
            model,
            base,
            quantized,
            report,
            budget,
            ranges,
            exclude,
            means,
            reference,
            max_error,
            float_ms,
            stage("speed check"),
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
        notes=report.notes + mask_notes(reference.mask),
        method=method,
        seconds=seconds,
        quantize=report,
        speed=speed,
        plan=_plan_of(report, profile),
    )


def _plan_of(report: QuantizeReport, profile: TargetProfile) -> Plan:
    """The materialized QDQ layout as a `Plan`: what each layer got, and why the rest not."""
    weights = profile.weight.describe()
    applied = {name: f"int8 compute ({weights} weights)" for name in report.quantized}
    applied.update((name, f"{weights} weights, float compute") for name in report.weight_only)
    declined = {n: r for n, r in report.kept_float.items() if n not in applied}
    return Plan("int8", profile.name, applied, declined)


class Int8Stage:
    """`--quantize int8` as a lossy stage (`onnxshrink.quant.lossy`): `quantize_int8` with the
    user's settings."""

    name = "int8"
    summary = "static int8 (QDQ) with calibration, within the error budget"

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
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
            mask_input=settings.mask_input,
            calibration_workers=settings.calibration_workers,
            search_workers=settings.search_workers,
        )


STAGE = Int8Stage()


def _speed_aware(
    model: onnx.ModelProto,
    base: onnx.ModelProto,
    quantized: onnx.ModelProto,
    report: QuantizeReport,
    budget: BudgetReport,
    ranges: dict[str, tuple[float, float]],
    exclude: Sequence[str],
    means: Mapping[str, np.ndarray] | None,
    reference: ErrorReference,
    max_error: float,
    float_ms: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[onnx.ModelProto, QuantizeReport, SpeedCheck]:
    """Module docstring 5: int8 compute, or float compute with int8 weights, by measurement.

    `float_ms`: the float model's latency, timed apart beforehand (a large model); the two
    candidates are then timed against each other only.
    """
    # int8 storage only where it costs no speed: MatMul/Gemm (a Conv whose weight goes through
    # a DQ loses ORT's NCHWc kernels; quantize.py case 6)
    storable = {
        c.name
        for c in quantizable_nodes(model, "ort-cpu", exclude=exclude)
        if c.op in ("MatMul", "Gemm") and (c.quantizable or c.weight_only_ok)
    }
    large = model_bytes(model) > SESSION_FILE_BYTES
    if large:  # what the budget search's candidates left in the heap (issue 9, 4)
        release_memory()
    weights, weights_report = quantize_qdq(
        base, ranges, exclude=exclude, nodes=set(), weight_only=storable, input_means=means
    )
    if large:
        release_memory()
    weights_error = reference.error(weights, "the float-compute candidate")
    budget.sessions += 1
    within = weights_error <= max_error  # over budget, it is not a candidate (not timed)
    feed = _latency_feed(model, reference)
    if float_ms is not None:
        # A large model (issue 9, 4): the float model was timed on its own before the budget
        # search, so that the float weights are never held by Python, a float session and the
        # candidates at once; the two candidates are timed against each other here. The
        # slower-than-float warning is then judged on runs timed apart, not interleaved.
        ms = interleaved_ms([quantized] + ([weights] if within else []), feed, SPEED_RUNS, progress)
        speed = SpeedCheck(float_ms, ms[0], SPEED_RUNS, ms[1] if within else None, float_apart=True)
    else:
        speed = speed_check(
            model, quantized, feed, weights_model=weights if within else None, progress=progress
        )
    logger.info(
        "speed: float %.2f ms, int8 %.2f ms, float compute with int8 weights %s ms",
        speed.float_ms,
        speed.int8_ms,
        "-" if speed.weights_ms is None else f"{speed.weights_ms:.2f}",
    )
    if speed.weights_ms is not None and speed.weights_ms < (1.0 - SPEED_MARGIN) * speed.int8_ms:
        speed = dataclasses.replace(speed, chosen="weights")
        for name in report.quantized:
            weights_report.kept_float[name] = "int8 compute not faster here (speed check)"
        weights_report.notes.extend(n for n in report.notes if n not in weights_report.notes)
        weights_report.notes.append(
            f"speed check: int8 compute ran {speed.int8_ms:.2f} ms, float compute with int8 "
            f"weights {speed.weights_ms:.2f} ms, the float model {speed.float_ms:.2f} ms "
            f"({speed.how}): int8 kernels do not pay off at these "
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
            f"machine ({speed.result_ms:.2f} vs {speed.float_ms:.2f} ms, {speed.how}); without "
            "--quantize the result is faster"
        )
    return quantized, report, speed


def _latency_feed(model: onnx.ModelProto, reference: ErrorReference) -> dict[str, np.ndarray]:
    """One sample of the budget's first feed: the latency a deployment runs at (the budget's
    feeds may hold several)."""
    return next(split_feed(reference.feeds[0], declared_batches(model), 1))


def _smoothable(
    model: onnx.ModelProto, target: str, exclude: Sequence[str]
) -> dict[str, list[str]]:
    """Activation tensor -> the int8 MatMuls reading it that smoothing can help (docstring 3c):
    those `quantizable_nodes` quantizes (not excluded, a constant 2-D weight)."""
    quantizable = {
        c.name for c in quantizable_nodes(model, target, exclude=exclude) if c.quantizable
    }
    found = {}
    for tensor, readers in smoothable_tensors(model, keep_other_readers=True).items():
        if any(r in quantizable for r in readers):
            found[tensor] = readers
    return found


def _has_outlier_channels(channel_ranges: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> bool:
    """Module docstring 3c: does some smoothable tensor have a channel of `SMOOTHING_OUTLIER`
    times its median channel's magnitude (what smoothing is for)?"""
    for lo, hi in channel_ranges.values():
        magnitude = np.maximum(-lo, hi)
        median = float(np.median(magnitude))
        if median > 0.0 and float(magnitude.max()) >= SMOOTHING_OUTLIER * median:
            return True
    return False


def _choose_smoothing(
    base: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    channel_ranges: Mapping[str, tuple[np.ndarray, np.ndarray]],
    target: str,
    exclude: Sequence[str],
    means: Mapping[str, np.ndarray] | None,
    reference: ErrorReference,
) -> tuple[onnx.ModelProto, dict[str, tuple[float, float]], list[str], int]:
    """Module docstring 3c: smoothing with the alpha whose fully quantized model has the least
    error, or none. Returns (model, ranges, notes, sessions measured)."""

    def error_of(candidate: onnx.ModelProto, cand_ranges: dict) -> float:
        built, _ = quantize_qdq(
            candidate, cand_ranges, target=target, exclude=exclude, input_means=means
        )
        return reference.error(built, "smoothing candidate")

    absmax = {t: np.maximum(-lo, hi) for t, (lo, hi) in channel_ranges.items()}
    unsmoothed = error_of(base, ranges)
    best: tuple[float, float | None, onnx.ModelProto, dict[str, tuple[float, float]]] = (
        unsmoothed,
        None,
        base,
        ranges,
    )
    sessions = 1
    for alpha in SMOOTHING_ALPHAS:
        smoothed, report = smooth_matmuls(
            base, absmax, alpha, tensors=list(channel_ranges), keep_other_readers=True
        )
        if not report.outputs:
            continue
        inverse = _smoothing_inverses(smoothed, report.outputs.values())
        smoothed_ranges = dict(ranges)
        for tensor, out in report.outputs.items():
            lo, hi = channel_ranges[tensor]
            inv = inverse[out]  # x / s = x * inv, inv > 0 per channel
            smoothed_ranges[out] = (float(np.min(lo * inv)), float(np.max(hi * inv)))
        error = error_of(smoothed, smoothed_ranges)
        sessions += 1
        logger.info("smoothing alpha %.2f: error %.4g (none: %.4g)", alpha, error, best[0])
        if error < best[0]:
            best = (error, alpha, smoothed, smoothed_ranges)
    best_error, chosen_alpha, chosen, chosen_ranges = best
    if chosen_alpha is None:
        return base, ranges, [], sessions
    note = (
        f"activation smoothing (SmoothQuant, alpha {chosen_alpha:g}) before "
        f"{len(channel_ranges)} int8 MatMul input(s): fully quantized error {best_error:.3g}, "
        f"against {unsmoothed:.3g} without"
    )
    return chosen, chosen_ranges, [note], sessions


def _smoothing_inverses(model: onnx.ModelProto, outputs: Iterable[str]) -> dict[str, np.ndarray]:
    """Smoothed tensor -> the per-channel factor its Mul applies (the constant input)."""
    wanted = set(outputs)
    constants = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Mul" and node.output[0] in wanted:
            for name in node.input:
                if name in constants:
                    found[node.output[0]] = array_of(constants[name]).astype(np.float64)
    return found


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
