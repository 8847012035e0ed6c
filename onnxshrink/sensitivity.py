"""Sensitivity analysis: keep the layers whose quantization hurts most in float, within a budget.

Error figure. For a candidate model q and the float model f, run on the same feeds (the first
`samples` calibration feeds), the error is the noise-to-signal ratio of the graph outputs,

    NSR_o = sum_{feeds, elements} (q_o - f_o)^2 / sum_{feeds, elements} f_o^2,
    error = mean over the float outputs o of NSR_o,

pooled over feeds before dividing (one figure per output, not a mean of per-feed ratios). It is
scale-free (an output scaled by c keeps its NSR) and equals `10^(-SNR_dB / 10)`; for small
errors it is about `2 (1 - cosine)`. Non-float outputs are left out; an output that is all zero
in float counts 0 when q is zero too and inf otherwise.

Algorithm:

1. Reference. The float model runs once per feed; its outputs are cached (memory grows with
   `samples`, not with the calibration set).
2. Ranking (`layer_sensitivity`). For each quantizable node (`quantize.quantizable_nodes` with
   no reason, and a calibrated range for its input), the model with that node alone quantized
   (`quantize_qdq(nodes={name})`) is measured: one ORT session per node. Sorted by error,
   largest first (ties by graph order).
3. Budget (`quantize_with_budget`). Everything eligible is quantized and measured. When the
   error exceeds `max_error`, the k most sensitive nodes of the ranking stay float, with the
   least k found by galloping (k = 1, 2, 4, ... until one meets the budget) then bisection
   between the last failing and first passing k: error(0) > budget, error(N) = 0 (nothing
   quantized), so at most about 2 log2(N) sessions, fewer when few nodes must stay float. The
   search assumes error(k) falls as k grows; when it does not (measured NSR is noisy), the k
   found still meets the budget (it was measured), it may just not be the least such k.
4. Default budget `DEFAULT_MAX_ERROR` = 0.002 (SNR about 27 dB). Chosen once, generically, on the
   PP-OCR zoo (calibration split only for the ranking; eval split only to read the figures):
   see the constant's comment for the measurement.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxshrink.errors import UsageError, first_line
from onnxshrink.parity import ort_session
from onnxshrink.quantize import QuantizeReport, quantizable_nodes, quantize_qdq

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Feed = dict[str, np.ndarray]

#: Default error budget (mean output noise-to-signal ratio, SNR about 27 dB; docstring 4).
#: Chosen once on the zoo, not per model: percentile ranges on 32 calibration feeds, ranking
#: and errors on 8 of them, CER/agreement on the held-out split (64 lines), k = nodes kept:
#:   v4-rec: k=0 NSR 0.0081 CER +0.47 pt; k=4 0.011 +0.47; k=6 0.00036 +0.00; k=8 0.00013 +0.31
#:   v5-rec: k=0 NSR 0.050 CER +0.93 pt; k=2 0.026 +0.31; k=3 0.0011 +0.00; k=4 0.00085 +0.00
#:   v4-cls: k=0 NSR < 1e-5, agreement 100% (nothing kept)
#: 0.002 is the loosest round figure that puts both rec models at <= 0.3 pt over fp32 on that
#: sweep; 0.01 would have left v4-rec fully quantized (+0.47 pt). NSR is noisy with 8 feeds and
#: not monotone in k (v4-rec: k=1..4 worse than k=0), so the budget has margin.
DEFAULT_MAX_ERROR = 0.002
DEFAULT_SAMPLES = 8


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

    @property
    def within_budget(self) -> bool:
        return self.final_error <= self.max_error


class _Reference:
    """The first `samples` feeds and the float model's outputs on them (module docstring 1)."""

    def __init__(self, model: onnx.ModelProto, feeds: Iterable[Feed], samples: int) -> None:
        if samples < 1:
            raise UsageError(f"sensitivity samples {samples}: must be at least 1")
        sess = _session(model, "the float model")
        inputs = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]
        self.feeds: list[Feed] = []
        self.outputs: list[list[np.ndarray]] = []
        for feed in itertools.islice(iter(feeds), samples):
            missing = [n for n in inputs if n not in feed]
            if missing:
                raise UsageError(f"calibration feed lacks model input(s) {', '.join(missing)}")
            trimmed = {n: feed[n] for n in inputs}
            self.feeds.append(trimmed)
            self.outputs.append(sess.run(None, trimmed))
        if not self.feeds:
            raise UsageError("sensitivity analysis needs at least one calibration feed")
        self.floating = [
            i
            for i, value in enumerate(self.outputs[0])
            if np.issubdtype(np.asarray(value).dtype, np.floating)
        ]
        if not self.floating:
            raise UsageError("sensitivity analysis needs a float graph output; the model has none")

    def error(self, candidate: onnx.ModelProto, what: str) -> float:
        """The mean output NSR of `candidate` on the cached feeds (one session)."""
        sess = _session(candidate, what)
        runs = [sess.run(None, feed) for feed in self.feeds]
        return output_error(self.outputs, runs, self.floating)


def output_error(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    outputs: Sequence[int] | None = None,
) -> float:
    """Mean over outputs of `sum (c - r)^2 / sum r^2`, pooled over runs (module docstring).

    `reference[run][output]` and `candidate[run][output]`; `outputs` picks output indices
    (default all). Mismatched shapes give inf.
    """
    if not reference:
        return 0.0
    indices = range(len(reference[0])) if outputs is None else outputs
    ratios = []
    for o in indices:
        noise = signal = 0.0
        for ref_run, cand_run in zip(reference, candidate, strict=True):
            r = np.asarray(ref_run[o], dtype=np.float64).ravel()
            c = np.asarray(cand_run[o], dtype=np.float64).ravel()
            if r.shape != c.shape:
                return math.inf
            d = c - r
            noise += float(np.dot(d, d))
            signal += float(np.dot(r, r))
        if noise == 0.0:
            ratios.append(0.0)
        elif signal == 0.0 or not math.isfinite(noise):
            ratios.append(math.inf)
        else:
            ratios.append(noise / signal)
    return float(np.mean(ratios)) if ratios else 0.0


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
    _reference: _Reference | None = None,
) -> list[LayerError]:
    """Each eligible node's output error when quantized alone, largest first (docstring 2).

    `feeds` is iterated once (its first `samples` feeds); one ORT session per node plus one
    for the float model. Raises UsageError when the model has no float output or no feeds.
    """
    reference = _reference or _Reference(model, feeds, samples)
    nodes = eligible_nodes(model, ranges, target, exclude)
    errors: list[LayerError] = []
    for i, (name, op) in enumerate(nodes):
        single, _ = quantize_qdq(model, ranges, target=target, nodes={name})
        errors.append(LayerError(name, op, reference.error(single, f"{name} quantized alone")))
        if progress is not None:
            progress(i + 1, len(nodes))
    order = sorted(range(len(errors)), key=lambda i: (-errors[i].error, i))
    ranked = [errors[i] for i in order]
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
) -> tuple[onnx.ModelProto, BudgetReport]:
    """Quantize every eligible node, then keep the most sensitive in float until error <= budget.

    Returns the QDQ model and a BudgetReport (its `quantize` is quantize_qdq's report of the
    returned model). `ranking` (from `layer_sensitivity` on the same model, ranges and target)
    skips the ranking; otherwise it is computed only when the fully quantized model is over
    budget. `feeds` is iterated once. Raises UsageError for a negative or non-finite budget.
    """
    if not (max_error >= 0.0 and math.isfinite(max_error)):
        raise UsageError(f"--max-error {max_error}: must be a finite number >= 0")
    reference = _Reference(model, feeds, samples)
    report = BudgetReport(max_error=max_error)

    # every Conv/Gemm/MatMul name (unnamed ones as quantize_qdq names them): leaving a node out
    # of `nodes` keeps it float while the other nodes keep their own reasons
    everything = {c.name for c in quantizable_nodes(model, target)}
    errors: dict[str, float] = {}

    def build(kept: Sequence[str]) -> tuple[onnx.ModelProto, QuantizeReport]:
        built, qreport = quantize_qdq(
            model, ranges, target=target, exclude=exclude, nodes=everything - set(kept)
        )
        for name in kept:
            qreport.kept_float[name] = f"sensitive: error {errors[name]:.3g} quantized alone"
        return built, qreport

    def measure(k: int, ranked: Sequence[LayerError]) -> tuple[onnx.ModelProto, QuantizeReport]:
        kept = [e.name for e in ranked[:k]]
        built, qreport = build(kept)
        error = reference.error(built, f"quantized model with {k} node(s) kept float")
        report.sessions += 1
        report.steps.append((k, error))
        logger.info("%d most sensitive node(s) float: error %.4g", k, error)
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
                _reference=reference,
            )
            report.sessions += len(ranked)
        report.ranking = list(ranked)
        errors.update((e.name, e.error) for e in ranked)
        lo, hi = 0, len(ranked)  # error(lo) > budget; error(hi) = 0 unless measured
        best: tuple[onnx.ModelProto, QuantizeReport, float] | None = None
        # galloping (k = 1, 2, 4, ...) before bisecting favours small k when error(k) is not
        # monotone: a plain bisection's first probe at N/2 may fail by chance and push k up
        step = 1
        while step < hi:
            built, step_report = measure(step, ranked)
            if report.steps[-1][1] <= max_error:
                hi, best = step, (built, step_report, report.steps[-1][1])
                break
            lo, step = step, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            built, mid_report = measure(mid, ranked)
            if report.steps[-1][1] <= max_error:
                hi, best = mid, (built, mid_report, report.steps[-1][1])
            else:
                lo = mid
        if best is None:  # only k = N meets it: nothing quantized
            qmodel, qreport = build([e.name for e in ranked])
            report.final_error = 0.0
            report.steps.append((len(ranked), 0.0))
        else:
            qmodel, qreport, report.final_error = best
        report.kept_float = {e.name: e.error for e in ranked[:hi]}
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
