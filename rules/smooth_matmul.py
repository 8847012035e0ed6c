"""Smooth activations before int8 MatMuls (SmoothQuant, Xiao et al. 2023): x B = (x / s)(diag(s) B).

A per-tensor int8/uint8 grid for an activation `x[..., K]` is as coarse as its largest channel:
one outlier channel (common after LayerNormalization in transformers) leaves the others a few
levels. Weights are quantized per output column, so they can absorb a per-input-channel
factor. With `s[K] > 0`:

    x B = sum_j x_j B_j = sum_j (x_j / s_j) (s_j B_j) = (x diag(1/s)) (diag(s) B)

which is exact in real arithmetic; in float32 it moves the result by a few ulps. From a
calibrated per-channel `a_j = max |x_j|` and the weights' `w_j = max_n |B_jn|`:

    s_j = a_j^alpha / w_j^(1 - alpha),   clamped to [1e-5, 1e5];   s_j = 1 where a_j or w_j is 0

alpha = 1 makes every channel of `x / s` peak at 1 (all the spread moves into the weights),
alpha = 0 makes every weight row peak at 1 (the activation keeps all its spread), alpha around
0.5 splits the spread between them (the paper uses 0.5; 0.7-0.85 for models with strong
outliers).

1. Smoothable tensors. A tensor x of the main graph, not an initializer, with a producer in
   the main graph, and read by a MatMul of the main graph in the default domain as input 0 (A)
   with, at input 1, a 2-D float32 initializer B[K, N] that is not a graph input and that no
   other node (nor a graph output) reads (a shared B would be scaled for its other reader
   too). All such readers must agree on K. By default (strict) also: x is not a graph input or
   output, and EVERY node that reads x, in any scope, is such a MatMul; a tensor that anything
   else reads is left alone.
   b. With `keep_other_readers=True` the condition is on the readers that get smoothed, not on
      the tensor: x may also be a graph input or output and be read by other nodes (the
      residual Add and the Shape beside a transformer's LayerNorm -> Q/K/V). The Mul writes a
      new tensor and leaves x as it is, so those readers keep reading x and only the
      qualifying MatMuls move to x / s: still exact. x needs at least one qualifying MatMul
      reader. It costs one more live tensor between the producer and x's last reader. (The
      strict default matters only to a variant that folds 1/s into x's producer, e.g. into
      LayerNorm's gamma and beta, which this module does not do.)
2. One scale vector per tensor: with several MatMul readers (Q, K, V projections of one
   LayerNormalization output), `w_j` is the max over all their weight rows, so one
   `Mul(x, 1/s)` serves them all and each reader's B_j is multiplied by the same s_j.
3. Rewrite: `Mul(x, inv_s)` (inv_s a float32 initializer [K], `1/s` rounded to float32) goes
   right after x's producer, so the node list stays topologically sorted; every MatMul reader
   reads its output; each B becomes a new initializer `B / inv_s` (row j times s_j, divided by
   the stored reciprocal so the pair cancels as closely as float32 allows); the old B is
   dropped (nothing else read it, case 1). A graph input's Mul goes first (case 1b). Tensors
   whose scales are all 1 are left alone.
4. Calibration. `ChannelAbsMax` streams `max |x_j|` over the last axis (NaN/inf ignored, state
   one vector of K). Ranges for the int8 activations must be calibrated on the smoothed
   model: the tensor quantized is the Mul's output (`SmoothReport.outputs`), not x.

Unnamed nodes are named `<op>_<index>` first (as `onnxshrink.rules.qdq` names them), so the
MatMul names in the results are the names in the returned model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.engine.io import (
    NameAllocator,
    array_of,
    graph_protos,
    named,
    named_copy,
    node_subgraphs,
)
from onnxshrink.engine.protos import splice_nodes
from onnxshrink.errors import UsageError

logger = logging.getLogger(__name__)

#: the clamp on s (module docstring): keeps 1/s and the scaled weights well inside float32
SCALE_MIN = 1e-5
SCALE_MAX = 1e5
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class SmoothReport:
    """What `smooth_matmuls` did, per activation tensor."""

    alpha: float
    #: tensor -> max(s) / min(s) of its smoothing scales (how much spread moved into weights)
    smoothed: dict[str, float] = field(default_factory=dict)
    #: tensor -> the Mul output its MatMuls now read (the tensor to calibrate and quantize)
    outputs: dict[str, str] = field(default_factory=dict)
    #: tensor -> why it was not smoothed
    skipped: dict[str, str] = field(default_factory=dict)


class ChannelAbsMax:
    """Streaming `max |x|` per channel of the last axis (module docstring, 4).

    `update` accepts arrays of any leading shape whose last axis has the same length every time
    (a change is a programming error: ValueError); NaN and inf are ignored (a channel that only
    ever saw them reads 0). State is one float64 vector of K and a row count.
    """

    def __init__(self) -> None:
        self.absmax: np.ndarray | None = None
        self.count = 0  # rows (positions) seen

    def update(self, array: np.ndarray) -> None:
        """Fold one array `[..., K]` into the maxima."""
        x = np.asarray(array)
        if x.ndim == 0 or x.size == 0:
            return
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        rows = x.reshape(-1, x.shape[-1])
        # max and min separately: no |x| copy of the whole array; fmax/fmin skip NaN
        hi = np.fmax.reduce(rows, axis=0)
        lo = np.fmin.reduce(rows, axis=0)
        peak = np.fmax(hi, -lo).astype(np.float64)
        if not np.all(np.isfinite(peak)):  # rare: inf (or an all-NaN channel) counts as absent
            finite = np.where(np.isfinite(rows), np.abs(rows), 0)
            peak = finite.max(axis=0).astype(np.float64)
        if self.absmax is None:
            self.absmax = peak
        elif self.absmax.shape != peak.shape:
            raise ValueError(f"channel count changed: {self.absmax.shape[0]} -> {peak.shape[0]}")
        else:
            np.maximum(self.absmax, peak, out=self.absmax)
        self.count += rows.shape[0]

    def value(self) -> np.ndarray | None:
        """The per-channel maxima (float64, a copy), None when nothing was observed."""
        return None if self.absmax is None else self.absmax.copy()

    @property
    def nbytes(self) -> int:
        """Bytes of state held: constant in the number of updates."""
        return (0 if self.absmax is None else int(self.absmax.nbytes)) + 8


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / w_j^(1-alpha), clamped, 1 where a_j or w_j is 0 (module docstring)."""
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    live = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[live] = a[live] ** alpha / w[live] ** (1.0 - alpha)
    return np.clip(s, SCALE_MIN, SCALE_MAX)


def smoothable_tensors(
    model: onnx.ModelProto, *, keep_other_readers: bool = False
) -> dict[str, list[str]]:
    """Activation tensor -> names of the MatMuls to smooth, for every smoothable tensor (case 1).

    Tensors in graph order; unnamed nodes are named as in the model `smooth_matmuls` returns.
    `keep_other_readers`: as in `smooth_matmuls` (case 1b).
    """
    smoothable, _ = _analyse(named(model), keep_other_readers)  # read only
    return {x: [node.name for node in readers] for x, readers in smoothable.items()}


def smooth_matmuls(
    model: onnx.ModelProto,
    channel_absmax: Mapping[str, np.ndarray],
    alpha: float,
    *,
    tensors: Collection[str] | None = None,
    keep_other_readers: bool = False,
) -> tuple[onnx.ModelProto, SmoothReport]:
    """Smooth the smoothable tensors (or only `tensors`) with calibrated maxima; `model` is kept.

    - `channel_absmax`: tensor -> `max |x_j|` over its last axis on calibration data
      (`ChannelAbsMax.value()`); a tensor without one, or with the wrong length, is skipped.
    - `alpha` in [0, 1] (UsageError otherwise): the migration strength of the module docstring.
    - `tensors`: restrict to these names; each one not smoothed gets a reason in the report.
    - `keep_other_readers`: also smooth tensors that other nodes read or that are graph inputs
      or outputs; only the qualifying MatMuls read x / s, everything else keeps reading x
      (case 1b). Off by default: case 1's strict condition.
    Calibrate the int8 ranges on the returned model (module docstring, 4).
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise UsageError(f"smoothing alpha must be in [0, 1], not {alpha!r}")
    work = named_copy(model)
    graph = work.graph
    report = SmoothReport(alpha=float(alpha))
    smoothable, declined = _analyse(work, keep_other_readers)
    wanted = [*smoothable, *declined] if tensors is None else list(dict.fromkeys(tensors))

    initializers = {t.name: t for t in graph.initializer}
    plans: list[_SmoothPlan] = []
    for x in wanted:  # decide everything before touching the graph
        if x not in smoothable:
            report.skipped[x] = declined.get(x, "not read by a MatMul of the main graph")
            continue
        readers = smoothable[x]  # nodes, not names: names may repeat in a model
        weights = [array_of(initializers[r.input[1]]) for r in readers]
        k = weights[0].shape[0]
        amax = channel_absmax.get(x)
        if amax is None:
            report.skipped[x] = "no calibrated channel maxima"
            continue
        a = np.asarray(amax, dtype=np.float64)
        if a.shape != (k,):
            report.skipped[x] = f"channel maxima have shape {list(a.shape)}, expected [{k}]"
            continue
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            report.skipped[x] = "channel maxima are not finite and non-negative"
            continue
        w = np.max([np.abs(b.astype(np.float64)).max(axis=1) for b in weights], axis=0)  # case 2
        s = smoothing_scales(a, w, alpha)
        if np.all(s == 1.0):
            report.skipped[x] = "every smoothing scale is 1"
            continue
        plans.append(_SmoothPlan(x, readers, weights, s))

    if plans:
        _rewrite(work, plans, report)
    logger.info(
        "smoothing (alpha %.2f): %d tensor(s) smoothed, %d skipped",
        alpha,
        len(report.smoothed),
        len(report.skipped),
    )
    return work, report


# ---------------------------------------------------------------------------------------------
# Matching (case 1)
# ---------------------------------------------------------------------------------------------


@dataclass
class _SmoothPlan:
    tensor: str
    readers: list[onnx.NodeProto]  # the MatMuls, in the main graph
    weights: list[np.ndarray]  # their B, in reader order
    scales: np.ndarray  # s, float64 [K]


def _analyse(
    model: onnx.ModelProto, keep: bool
) -> tuple[dict[str, list[onnx.NodeProto]], dict[str, str]]:
    """(smoothable tensor -> the MatMuls to smooth, other MatMul A inputs -> why not); case 1.

    `keep`: `keep_other_readers` (case 1b).
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    graph_outputs = {v.name for v in graph.output}
    produced = {o for n in graph.node for o in n.output if o}
    # tensor -> (node, in the main graph) for each node reading it, in any scope; a node
    # reading a tensor twice counts once (protobuf wrappers have no stable identity to test)
    readers: dict[str, list[tuple[onnx.NodeProto, bool]]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                readers.setdefault(name, []).append((node, True))
    for sub in (g for n in graph.node for g in node_subgraphs(n)):
        for node in _all_nodes(sub):
            for name in dict.fromkeys(node.input):
                if name:
                    readers.setdefault(name, []).append((node, False))

    def reader_reason(node: onnx.NodeProto, in_main: bool, x: str) -> str | None:
        """Why `node`, a reader of x, stops x from being smoothed; None when it is fine."""
        if not in_main:
            return f"also read by {node.op_type} {node.name} inside a subgraph"
        if node.op_type != "MatMul":
            return f"also read by {node.op_type} {node.name}"
        if node.domain not in _DEFAULT_DOMAINS:
            return f"also read by MatMul {node.name} of domain {node.domain!r}"
        if len(node.input) != 2 or node.input[0] != x or node.input[1] == x:
            return f"MatMul {node.name} reads it as B"
        b = node.input[1]
        tensor = initializers.get(b)
        if tensor is None:
            return f"MatMul {node.name}: B is not a constant initializer"
        if b in graph_inputs:
            return f"MatMul {node.name}: B is also a graph input"
        if tensor.data_type != onnx.TensorProto.FLOAT:
            return f"MatMul {node.name}: B is not float32"
        if len(tensor.dims) != 2:
            return f"MatMul {node.name}: B is {len(tensor.dims)}-D, not 2-D"
        if b in graph_outputs or len(readers[b]) != 1:
            return f"MatMul {node.name}: B is shared with another reader"
        return None

    smoothable: dict[str, list[onnx.NodeProto]] = {}
    declined: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in _DEFAULT_DOMAINS or not node.input:
            continue
        x = node.input[0]
        if not x or x in smoothable or x in declined:
            continue
        reason = _tensor_reason(x, initializers, graph_inputs, graph_outputs, produced, keep)
        chosen: list[onnx.NodeProto] = []
        if reason is None:
            reasons = [(n, reader_reason(n, m, x)) for n, m in readers[x]]
            chosen = [n for n, r in reasons if r is None]
            refused = [r for _, r in reasons if r is not None]
            if refused and (not keep or not chosen):  # case 1b: others keep reading x
                reason = refused[0]
        if reason is None:
            ks = {initializers[r.input[1]].dims[0] for r in chosen}
            if len(ks) != 1:  # cannot happen in a valid model (K is x's last dim); be safe
                reason = f"MatMul readers disagree on K: {sorted(ks)}"
        if reason is None:
            smoothable[x] = chosen
        else:
            declined[x] = reason
    return smoothable, declined


def _tensor_reason(
    x: str,
    initializers: Mapping[str, onnx.TensorProto],
    graph_inputs: Collection[str],
    graph_outputs: Collection[str],
    produced: Collection[str],
    keep: bool,
) -> str | None:
    if x in initializers:
        return "activation is a constant initializer"
    if x in graph_inputs:
        return None if keep else "graph input (keep_other_readers=False)"
    if x in graph_outputs and not keep:
        return "graph output (keep_other_readers=False)"
    if x not in produced:
        return "no producer in the main graph"
    return None


# ---------------------------------------------------------------------------------------------
# Rewrite (case 3)
# ---------------------------------------------------------------------------------------------


def _rewrite(model: onnx.ModelProto, plans: list[_SmoothPlan], report: SmoothReport) -> None:
    graph = model.graph
    names = NameAllocator(model)
    producer_index = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    value_info = {v.name: v for v in graph.value_info}
    after: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    for plan in plans:
        x = plan.tensor
        inv = (1.0 / plan.scales).astype(np.float32)
        inv_name = names.new(f"{x}_smooth_inv_scale")
        out = names.new(f"{x}_smoothed")
        new_inits.append(numpy_helper.from_array(inv, inv_name))
        mul = helper.make_node("Mul", [x, inv_name], [out], name=names.new(f"{x}_smooth"))
        # a graph input has no producer: its Mul goes first (index -1)
        after.setdefault(producer_index.get(x, -1), []).append(mul)
        if x in value_info:  # same dtype and shape as x
            info = onnx.ValueInfoProto()
            info.CopyFrom(value_info[x])
            info.name = out
            graph.value_info.append(info)
        for reader, b in zip(plan.readers, plan.weights, strict=True):
            old = reader.input[1]
            scaled = (b.astype(np.float64) / inv.astype(np.float64)[:, None]).astype(np.float32)
            new = names.new(f"{old}_smoothed")
            new_inits.append(numpy_helper.from_array(scaled, new))
            reader.input[0] = out
            reader.input[1] = new
            dropped.add(old)
        report.smoothed[x] = float(plan.scales.max() / plan.scales.min())
        report.outputs[x] = out
        logger.debug(
            "smoothed %s for %s: s in [%.3g, %.3g]",
            x,
            [r.name for r in plan.readers],
            plan.scales.min(),
            plan.scales.max(),
        )

    splice_nodes(graph, after, new_inits, dropped)


# ---------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs, at any depth."""
    for g in graph_protos(graph):
        yield from g.node
