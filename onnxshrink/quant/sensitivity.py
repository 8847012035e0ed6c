"""The error budget of lossy stages: the error figure, its reference outputs, the default budget.

Error figure. For a candidate model q and the float model f, run on the same feeds (the feeds
holding the first `samples` calibration samples), the error is `onnxshrink.verify.measure`'s: the
noise-to-signal ratio `sum (q - f)^2 / sum f^2` of each output, judged per channel group so
that a small-valued part of an output (class scores beside box coordinates) counts as much as
a large one, and the worst float output's figure. It is scale-free and, for an output of one
scale, equals `10^(-SNR_dB / 10)`, about `2 (1 - cosine)` for small errors.

1. Reference (`ErrorReference`). The float model's outputs on the first `samples` samples,
   kept from the statistics pass (`record` as its `on_run` hook) or computed once
   (`from_model`); memory grows with `samples`, not with the calibration set.
2. Default budget `DEFAULT_MAX_ERROR` = 0.01 (SNR 20 dB). Chosen once, generically, on the
   PP-OCR zoo (calibration split only for the ranking; eval split only to read the figures):
   see the constant's comment for the measurement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from onnxshrink.rules.qdq import QuantizeReport

from onnxshrink.errors import UsageError, first_line
from onnxshrink.verify.measure import model_error
from onnxshrink.verify.parity import declared_batches, feed_samples, model_inputs, ort_session

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Feed = dict[str, np.ndarray]

#: Default error budget (output noise-to-signal ratio, SNR 20 dB; docstring 2). Chosen
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
#: calibration samples the budget is measured on, and how many of them the ranking uses
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
        #: the graph input masking padded positions (`onnxshrink.verify.measure`, 6), or None
        self.mask: str | None = None

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
        masks = [feed.get(self.mask) for feed in feeds] if self.mask else None
        return model_error(self.outputs[: len(runs)], runs, self.floating, masks)


def output_error(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    outputs: Sequence[int] | None = None,
) -> float:
    """The budget's error figure: `onnxshrink.verify.measure.model_error` (module docstring)."""
    return model_error(reference, candidate, outputs)


def _session(model: onnx.ModelProto, what: str):
    try:
        return ort_session(model)
    except Exception as exc:  # ORT raises many types; one line says which model failed
        raise UsageError(f"sensitivity: ORT cannot load {what}: {first_line(exc)}") from None
