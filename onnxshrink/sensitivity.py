"""Sensitivity analysis: keep the layers whose quantization hurts most in float, within a budget.

Error figure. For a candidate model q and the float model f, run on the same feeds (the feeds
holding the first `samples` calibration samples), the error is `onnxshrink.measure`'s: the
noise-to-signal ratio `sum (q - f)^2 / sum f^2` of each output, judged per channel group so
that a small-valued part of an output (class scores beside box coordinates) counts as much as
a large one, and the worst float output's figure. It is scale-free and, for an output of one
scale, equals `10^(-SNR_dB / 10)`, about `2 (1 - cosine)` for small errors.

Algorithm:

1. Reference (`ErrorReference`). The float model's outputs on the first `samples` samples,
   kept from the statistics pass (`record` as its `on_run` hook) or computed once
   (`from_model`); memory grows with `samples`, not with the calibration set.
2. Ranking (`layer_sensitivity`, with `onnxshrink.budget.rank`). For each quantizable node (`quantize.quantizable_nodes` with
   no reason, and a calibrated range for its input), the model with that node alone quantized
   (`quantize_qdq(nodes={name})`) is measured: one ORT session per node. Sorted by error,
   largest first (ties by graph order).
3. Budget (`quantize_with_budget`). Everything eligible is quantized and measured. When the
   error exceeds `max_error`, the k most sensitive nodes of the ranking stay float, with the
   least k found by `onnxshrink.budget.decline_fewest` (galloping, then bisection; about
   2 log2(N) sessions); when even k = N fails, nothing is quantized.
4. Default budget `DEFAULT_MAX_ERROR` = 0.01 (SNR 20 dB). Chosen once, generically, on the
   PP-OCR zoo (calibration split only for the ranking; eval split only to read the figures):
   see the constant's comment for the measurement.
5. Weight-only storage (not `tensorrt`; quantize_qdq case 6). Nodes float for structural reasons
   (no calibrated range, ...) store int8 weights in every step, so their rounding error is
   inside every measured figure. Of the k nodes kept float for sensitivity, those that can
   store int8 weights are sorted by weight size, largest first, and the longest prefix whose
   int8 storage still meets the budget is found by `onnxshrink.budget.grant_most` (all of
   them first: one session when it passes, about log2(k) more when not); the others stay
   entirely float. This is what
   makes the file small when the largest layer (often a classifier) is sensitive to
   activation quantization but not to weight rounding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxshrink.budget import decline_fewest, grant_most, rank
from onnxshrink.errors import UsageError, first_line
from onnxshrink.measure import model_error
from onnxshrink.parity import declared_batches, feed_samples, model_inputs, ort_session
from onnxshrink.quantize import QuantizeReport, quantizable_nodes, quantize_qdq

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Feed = dict[str, np.ndarray]

#: Default error budget (mean output noise-to-signal ratio, SNR 20 dB; docstring 4). Chosen
#: once on the zoo, not per model: percentile ranges from 64 calibration feeds, ranking on 16
#: and the budget on 32 of them, task metrics on the held-out split (bench/quantize_zoo.py's
#: data; /tmp sweeps with `quantize_int8(max_error=B)`), budget B -> layers kept float, metric:
#:   v5-rec (256 lines, fp32 CER 1.03%): 1.0 -> 0, CER 1.88%; 0.02 -> 1, 1.32%; 0.01 -> 6, 0.99%;
#:           0.005 -> 13, 0.92%
#:   v5-det (16 pages, IoU@0.3 vs fp32): 0.03 -> 2, 0.967; 0.01 -> 4, 0.982
#:   v4-rec (512 lines, fp32 CER 2.96%): 1.0 -> 0, 2.55%; 0.01 -> 13, 3.35%; 0.005 -> 17, 3.33%
#: 0.01 is the loosest round figure that keeps v5-rec within 0.3 pt of fp32 and v5-det above
#: 0.95 IoU with few layers float (each float layer costs speed). v4-rec does not follow the
#: figure: fully int8 it reads our lines better than fp32 and the closer variants worse, while
#: their CER against fp32's own decoding falls (1.29% -> 0.49% -> 0.51%); the metric moves by
#: about +-0.4 pt there whatever the budget.
DEFAULT_MAX_ERROR = 0.01
#: calibration feeds the budget is measured on, and how many of them the ranking uses
DEFAULT_SAMPLES = 32
RANKING_SAMPLES = 16


@dataclass(frozen=True)
class LayerError:
    """One node's sensitivity: the output error with that node alone quantized."""

    name: str
    op: str
    error: float


@dataclass
class BudgetReport:
    """What `quantize_with_budget` did: errors measured, nodes kept float for sensitivity."""

    max_error: float
    full_error: float = 0.0
    final_error: float = 0.0
    kept_float: dict[str, float] = field(default_factory=dict)
    steps: list[tuple[int, float]] = field(default_factory=list)
    sessions: int = 0
    ranking: list[LayerError] = field(default_factory=list)
    quantize: QuantizeReport | None = None
    #: the nodes kept float for sensitivity that store int8 weights (docstring 5)
    kept_weights_int8: list[str] = field(default_factory=list)

    @property
    def within_budget(self) -> bool:
        return self.final_error <= self.max_error


class ErrorReference:
    """Feeds holding the first `samples` calibration samples, and the float model's outputs on
    them (module docstring 1).

    Build it with `record` as the statistics pass's `on_run` hook (the float model then runs
    once over the calibration data in all), or with `from_model` to run the model here.
    `samples` counts samples, not feeds: a feed of 8 samples counts 8 (`feed_samples`).
    """

    def __init__(self, model: onnx.ModelProto, samples: int) -> None:
        if samples < 1:
            raise UsageError(f"sensitivity samples {samples}: must be at least 1")
        self.samples = samples
        self.inputs = [v.name for v in model_inputs(model)]
        self.output_names = [o.name for o in model.graph.output]
        self.declared = declared_batches(model)
        self.feeds: list[Feed] = []
        self.outputs: list[list[np.ndarray]] = []
        self.counts: list[int] = []  # samples per feed

    @property
    def full(self) -> bool:
        return sum(self.counts) >= self.samples

    def record(self, feed: Feed, outputs: list[np.ndarray]) -> None:
        """Keep `feed` and its float outputs until `samples` samples are held."""
        if self.full:
            return
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise UsageError(f"calibration feed lacks model input(s) {', '.join(missing)}")
        trimmed = {n: np.array(feed[n]) for n in self.inputs}  # a copy: feeds may be views
        self.feeds.append(trimmed)
        self.outputs.append(list(outputs))
        self.counts.append(feed_samples(trimmed, self.declared))

    @classmethod
    def from_model(
        cls, model: onnx.ModelProto, feeds: Iterable[Feed], samples: int
    ) -> ErrorReference:
        """Run the float model on the first feeds until `samples` samples are held."""
        reference = cls(model, samples)
        sess = _session(model, "the float model")
        for feed in feeds:
            missing = [n for n in reference.inputs if n not in feed]
            if missing:
                raise UsageError(f"calibration feed lacks model input(s) {', '.join(missing)}")
            reference.record(feed, sess.run(None, {n: feed[n] for n in reference.inputs}))
            if reference.full:
                break
        reference.check()
        return reference

    def check(self) -> None:
        """UsageError when nothing was recorded or no output is float."""
        if not self.feeds:
            raise UsageError("sensitivity analysis needs at least one calibration feed")
        self.floating = [
            i
            for i, value in enumerate(self.outputs[0])
            if np.issubdtype(np.asarray(value).dtype, np.floating)
        ]
        if not self.floating:
            raise UsageError("sensitivity analysis needs a float graph output; the model has none")

    def take(self, limit: int | None) -> int:
        """How many leading feeds hold about `limit` samples (at least one feed)."""
        if limit is None:
            return len(self.feeds)
        held = 0
        for i, count in enumerate(self.counts):
            held += count
            if held >= limit:
                return i + 1
        return len(self.feeds)

    def error(self, candidate: onnx.ModelProto, what: str, limit: int | None = None) -> float:
        """The output error of `candidate` on the cached feeds holding `limit` samples."""
        if not hasattr(self, "floating"):
            self.check()
        sess = _session(candidate, what)
        feeds = self.feeds[: self.take(limit)]
        runs = [sess.run(None, feed) for feed in feeds]
        return output_error(self.outputs[: len(runs)], runs, self.floating)


def output_error(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    outputs: Sequence[int] | None = None,
) -> float:
    """The budget's error figure: `onnxshrink.measure.model_error` (module docstring)."""
    return model_error(reference, candidate, outputs)


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
    _reference: ErrorReference | None = None,
) -> list[LayerError]:
    """Each eligible node's output error when quantized alone, largest first (docstring 2).

    `feeds` is iterated once (its first `samples` feeds); one ORT session per node plus one
    for the float model. Raises UsageError when the model has no float output or no feeds.
    """
    reference = _reference or ErrorReference.from_model(model, feeds, samples)
    nodes = eligible_nodes(model, ranges, target, exclude)
    ops = dict(nodes)

    def alone(name: str) -> onnx.ModelProto:
        # the others entirely float: the figure is this node's alone
        single, _ = quantize_qdq(
            model,
            ranges,
            target=target,
            nodes={name},
            weight_only=False,
            input_means=input_means,
        )
        return single

    def measured(single: onnx.ModelProto, name: str) -> float:
        return reference.error(single, f"{name} quantized alone", RANKING_SAMPLES)

    ranked = [
        LayerError(name, ops[name], error)
        for name, error in rank([n for n, _ in nodes], alone, measured, progress)
    ]
    if ranked:
        logger.info(
            "sensitivity of %d node(s): most sensitive %s (%.3g)",
            len(ranked),
            ranked[0].name,
            ranked[0].error,
        )
    return ranked


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
) -> tuple[onnx.ModelProto, BudgetReport]:
    """Quantize every eligible node, then keep the most sensitive in float until error <= budget.

    Returns the QDQ model and a BudgetReport (its `quantize` is quantize_qdq's report of the
    returned model). `ranking` (from `layer_sensitivity` on the same model, ranges and target)
    skips the ranking; otherwise it is computed only when the fully quantized model is over
    budget. `feeds` is iterated once. `weight_only` (default: on but for `tensorrt`) stores int8
    weights for nodes kept float (quantize_qdq case 6) where the budget allows; `input_means`
    turns on bias correction (quantize_qdq case 7) in every candidate measured; `reference`
    (an `ErrorReference` of the same model) reuses cached float outputs instead of `feeds`. Raises
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


def _session(model: onnx.ModelProto, what: str):
    try:
        return ort_session(model)
    except Exception as exc:  # ORT raises many types; one line says which model failed
        raise UsageError(f"sensitivity: ORT cannot load {what}: {first_line(exc)}") from None
