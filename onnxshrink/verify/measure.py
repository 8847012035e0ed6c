"""The error figure of a lossy stage: output noise-to-signal, judged per channel group.

A candidate model q is compared with the float model f on the same feeds. For one output,

    NSR = sum (q - f)^2 / sum f^2,

summed over runs and elements (one figure per output, not a mean of per-run ratios). It is
scale-free and equals `10^(-SNR_dB / 10)`; for small errors it is about `2 (1 - cosine)`.

One pooled figure hides a collapse when an output mixes scales: a detector that concatenates
box coordinates (0 to 320) with class scores (0 to 1) along one axis passed a pooled budget of
0.01 at 6.6e-4 while its scores fell 3x, because the boxes' energy drowned the scores'. So
each output is judged per channel group:

1. Channel axes. Rank 2 (`[N, C]`): axis 1. Rank 3 (`[N, A, B]`, e.g. `[N, boxes, 4 + classes]`
   or `[N, 4 + classes, anchors]`): axes 1 and 2, each on its own. Rank 4 and more (`NCHW`):
   axis 1 only, never a spatial axis (a page's empty margins would read as a "small part").
   An axis whose length changes between runs is dropped (dynamic sequence lengths).
2. Slices along an axis keep their own noise `n_k` and signal `s_k`, pooled over runs and the
   other axes. Slices are sorted by signal, and a new group starts wherever the RMS of one
   slice is more than `GROUP_GAP` (10x) that of the next smaller one: a box head and a score
   head fall into two groups, a continuum of channel scales (a BERT hidden state, a feature
   map) stays one group. Slices with no signal at all join the smallest group (their noise
   counts against it).
3. The output's figure is the worst group's `sum n / sum s` over its axes, and at least the
   pooled NSR. A probability output (non-negative rows summing to 1 along the last axis: a
   softmax over classes) is one quantity and is judged pooled: a class that is never likely
   would otherwise count as a "small part" of its own.
4. The model's figure is the worst output's (outputs that are not float are left out). An
   output that is all zero in float counts 0 when q is zero too and inf otherwise; shapes
   that differ count inf.

Everything is streamed: per slice two float64 sums, whatever the number of runs.

5. What the tool cannot guess, a user states: `--metric module:function` (or
   `file.py:function`) is called with the float model's and the candidate's outputs of each
   held-out batch, and its mean is reported beside these figures (`TaskMetric`).
6. Padding. A sequence model's outputs at padded positions are garbage its users never read
   (a BERT encoder's `last_hidden_state` where `attention_mask` is 0), and a lossy stage may
   move them a lot while every real position holds. So a position mask can be given: an
   integer graph input whose shape is the leading dims of an output (`[batch, seq]`); only
   positions where it is non-zero count for that output. `mask_input(model)` finds one: the
   input named by the user, else an integer input named `attention_mask` (the convention of
   Hugging Face exports, whatever the architecture), else none.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.errors import UsageError, first_line

#: a new channel group starts where a slice's RMS is this many times the next smaller one's
GROUP_GAP = 10.0
_DISTRIBUTION_TOL = 1e-3


def channel_axes(ndim: int) -> tuple[int, ...]:
    """The axes whose slices are judged on their own (module docstring, 1)."""
    if ndim == 2:
        return (1,)
    if ndim == 3:
        return (1, 2)
    if ndim >= 4:
        return (1,)
    return ()


def looks_like_distribution(ref: np.ndarray) -> bool:
    """Non-negative rows summing to 1 along the last axis (a softmax over >= 2 classes)."""
    if ref.ndim < 2 or ref.shape[-1] < 2 or ref.size == 0:
        return False
    if float(ref.min()) < 0.0:
        return False
    sums = ref.sum(axis=-1, dtype=np.float64)
    return bool(np.all(np.abs(sums - 1.0) <= _DISTRIBUTION_TOL))


class OutputNoise:
    """Streaming noise and signal of one output (module docstring), `update` per run.

    With `cosine`, it also sums what `cosine()` needs (the held-out report); the budget's
    sessions leave it off, since it costs two float64 copies of every output.
    """

    def __init__(self, cosine: bool = False) -> None:
        self.with_cosine = cosine
        self.noise = 0.0
        self.signal = 0.0
        self.cross = 0.0  # sum f q, and sum q^2: the cosine of the kept positions
        self.candidate = 0.0
        self.mismatch = False
        self.distribution = True
        self.runs = 0
        #: axis -> (noise per slice, signal per slice); None once the axis is dropped
        self.slices: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

    def update(self, ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Fold one run's reference and candidate values of this output in.

        `mask` (docstring, 6): where its leading dims match the output's, only the positions
        where it is non-zero count.
        """
        r = np.asarray(ref)
        c = np.asarray(cand)
        if r.shape != c.shape:
            self.mismatch = True
            return
        if mask is not None:
            m = np.asarray(mask)
            if m.ndim >= 1 and r.shape[: m.ndim] == m.shape:
                keep = m != 0
                r, c = r[keep], c[keep]  # [positions kept, trailing dims...]
        if r.dtype != np.float32:
            r = r.astype(np.float64)
        d = c.astype(r.dtype) - r
        d2 = d * d
        r2 = r * r
        self.noise += float(d2.sum(dtype=np.float64))
        self.signal += float(r2.sum(dtype=np.float64))
        if self.with_cosine:
            cand = c.astype(r.dtype)
            self.cross += float(np.vdot(r.astype(np.float64), cand.astype(np.float64)))
            self.candidate += float((cand * cand).sum(dtype=np.float64))
        if self.distribution and not looks_like_distribution(r):
            self.distribution = False
        axes = channel_axes(r.ndim)
        if self.runs == 0:
            self.slices = {a: None for a in axes}
            for a in axes:
                self.slices[a] = (np.zeros(r.shape[a]), np.zeros(r.shape[a]))
        self.runs += 1
        for a in axes:
            held = self.slices.get(a)
            if held is None or held[0].shape[0] != r.shape[a]:
                self.slices[a] = None  # 1: the axis changes length between runs
                continue
            others = tuple(i for i in range(r.ndim) if i != a)
            held[0][...] += d2.sum(axis=others, dtype=np.float64)
            held[1][...] += r2.sum(axis=others, dtype=np.float64)

    def cosine(self) -> float:
        """Cosine of everything seen (kept positions only), 1.0 when both are zero; needs
        `cosine=True`."""
        if not self.with_cosine:
            raise ValueError("OutputNoise(cosine=True) keeps what the cosine needs")
        if self.signal == 0.0 and self.candidate == 0.0:
            return 1.0
        if self.signal == 0.0 or self.candidate == 0.0:
            return 0.0
        return self.cross / math.sqrt(self.signal * self.candidate)

    def snr_db(self) -> float:
        """10 log10(sum f^2 / sum (q - f)^2) of everything seen; inf when identical."""
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def pooled(self) -> float:
        """sum (q - f)^2 / sum f^2 over everything seen."""
        return _ratio(self.noise, self.signal)

    def value(self) -> float:
        """The output's figure (module docstring, 3)."""
        if self.mismatch:
            return math.inf
        worst = self.pooled()
        if self.distribution or not math.isfinite(worst) or self.noise == 0.0:
            return worst
        for held in self.slices.values():
            if held is not None:
                worst = max(worst, grouped_nsr(*held))
        return worst


def grouped_nsr(noise: np.ndarray, signal: np.ndarray, gap: float = GROUP_GAP) -> float:
    """The worst channel group's NSR, slices grouped by signal scale (module docstring, 2)."""
    live = signal > 0.0
    if not np.any(live):
        return _ratio(float(noise.sum()), 0.0)
    order = np.argsort(signal[live])
    s = signal[live][order]
    n = noise[live][order]
    # energy ratio gap^2 between neighbours = RMS ratio gap (same element count per slice)
    starts = np.flatnonzero(s[1:] > s[:-1] * gap * gap) + 1
    bounds = [0, *starts.tolist(), len(s)]
    dead_noise = float(noise[~live].sum())
    worst = 0.0
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        group_noise = float(n[lo:hi].sum()) + (dead_noise if i == 0 else 0.0)
        worst = max(worst, _ratio(group_noise, float(s[lo:hi].sum())))
    return worst


def model_error(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    outputs: Sequence[int] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> float:
    """The worst output's figure (module docstring, 4) over runs of both models.

    `reference[run][output]` and `candidate[run][output]`; `outputs` picks output indices
    (default all); `masks[run]` is that run's position mask (docstring, 6), or None.
    """
    if not reference:
        return 0.0
    indices = list(range(len(reference[0]))) if outputs is None else list(outputs)
    noises = [OutputNoise() for _ in indices]
    run_masks = list(masks) if masks is not None else [None] * len(reference)
    for ref_run, cand_run, mask in zip(reference, candidate, run_masks, strict=True):
        for noise, o in zip(noises, indices, strict=True):
            noise.update(ref_run[o], cand_run[o], mask)
    return max((n.value() for n in noises), default=0.0)


#: the integer input taken as a position mask when the user names none (docstring, 6)
CONVENTIONAL_MASK = "attention_mask"
_INTEGER_TYPES = {
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
}


def mask_input(model: onnx.ModelProto, name: str | None = None) -> str | None:
    """The graph input that masks padded positions (docstring, 6), or None.

    `name`: the user's choice ("none" for no mask); UsageError when it is not an integer or
    bool graph input of the model.
    """
    inputs = {v.name: v for v in model.graph.input}
    if name is not None:
        if name == "none":
            return None
        value = inputs.get(name)
        if value is None or value.type.tensor_type.elem_type not in _INTEGER_TYPES:
            raise UsageError(f"--mask-input {name!r}: not an integer input of the model")
        return name
    value = inputs.get(CONVENTIONAL_MASK)
    if value is not None and value.type.tensor_type.elem_type in _INTEGER_TYPES:
        return CONVENTIONAL_MASK
    return None


def _ratio(noise: float, signal: float) -> float:
    if noise == 0.0:
        return 0.0
    if signal == 0.0 or not math.isfinite(noise):
        return math.inf
    return noise / signal


# --------------------------------------------------------------------------------------------
# A task metric of the user's (`--metric module:function`)

#: metric(reference, candidate) -> float: outputs by name, of one held-out batch
MetricFunction = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], float]


@dataclass
class TaskMetric:
    """A user's task metric and its running mean over held-out batches.

    The function takes the float model's and the candidate's outputs of one batch (dicts of
    output name -> array) and returns a number (e.g. 1 - IoU of detection maps, a CER
    change, a retrieval disagreement); the figure reported is its mean over batches.
    """

    spec: str
    function: MetricFunction
    total: float = 0.0
    batches: int = 0

    def update(self, names: list[str], ref: list[np.ndarray], cand: list[np.ndarray]) -> None:
        try:
            value = float(
                self.function(
                    dict(zip(names, ref, strict=True)), dict(zip(names, cand, strict=True))
                )
            )
        except Exception as exc:
            raise UsageError(
                f"--metric {self.spec}: failed on batch {self.batches}: {first_line(exc)}"
            ) from None
        if not math.isfinite(value):
            raise UsageError(f"--metric {self.spec}: returned {value} on batch {self.batches}")
        self.total += value
        self.batches += 1

    @property
    def value(self) -> float | None:
        return self.total / self.batches if self.batches else None


def load_metric(spec: str) -> TaskMetric:
    """`module:function` or `path/to/file.py:function` -> a TaskMetric; UsageError (one line)."""
    text = spec.strip()
    head, sep, function = text.rpartition(":")
    if not sep or not head or not function.isidentifier():
        raise UsageError(f"--metric {spec!r}: expected module:function or file.py:function")
    try:
        if head.endswith(".py"):
            path = Path(head)
            if not path.is_file():
                raise UsageError(f"--metric {spec}: no such file {head}")
            module_spec = importlib.util.spec_from_file_location(
                f"_onnxshrink_metric_{abs(hash(str(path.resolve())))}", path
            )
            if module_spec is None or module_spec.loader is None:
                raise ImportError("not importable as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(head)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--metric {spec}: cannot import {head}: {first_line(exc)}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise UsageError(f"--metric {spec}: {head} defines no function {function!r}")
    return TaskMetric(text, found)
