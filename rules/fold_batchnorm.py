"""Fold an inference-mode BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

BatchNormalization in inference mode is a per-channel affine map on axis 1:

    BN(y) = (y - mean) * gamma / sqrt(var + eps) + beta = y * s + t,
    s = gamma / sqrt(var + eps),   t = beta - mean * s.

When y = W (*) x + b comes from a layer with constant weights, the map moves into them:

    W' = W * gamma / sqrt(var + eps)               (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

The weight layouts (Conv [Cout, Cin/g, k...], ConvTranspose [Cin, Cout/g, k...] with groups,
Gemm with transB and C) are handled by `onnxshrink.engine.affine.fold_output_affine`, which
`fold-affine-into-producer` shares.

1. Producer is Conv or ConvTranspose: weights and bias rewritten in place (bias added if absent).
2. Producer is Gemm: B scaled along its output columns, `C' = beta * C * s + t`, `beta' = 1`.
3. Producer is MatMul with a 2-D input A (known from shapes) and a constant 2-D B: BN's channel
   axis 1 is then MatMul's last axis, so the pair becomes `Gemm(A, B * s, t)`. A MatMul with a
   higher-rank A is left alone: its axis 1 is not the weight's output axis.
4. Declines (each reported with its reason): BN in training mode (`training_mode=1`, or
   `is_test=0` before opset 7, or `spatial=0` in opsets 7-8), BN statistics outputs in use,
   non-constant BN parameters, parameters not of shape [C] for the producer's C channels,
   `var + eps <= 0`, a producer output that has other readers or is a graph output, a producer in
   another graph scope, non-constant weights, and a standalone BN whose input is not one of the
   producers above (it stays a BatchNormalization).
5. With the engine's `fold_scales` option off (see `onnxshrink.engine.affine`, case 3) BN is not
   folded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.affine import (
    FLOAT_DTYPES,
    LINEAR_PRODUCERS,
    SCALE_FOLDS_OFF,
    LinearProducer,
    fold_output_affine,
    linear_producer,
    scale_folds_allowed,
)
from onnxshrink.engine.graph import (
    const_value,
    detach,
    in_graph,
    is_graph_output,
    is_op,
    only_consumer,
    producer_of,
    replace_all_uses,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext

logger = logging.getLogger(__name__)


@dataclass
class _BatchNormMatch:
    bn: gs.Node
    producer: gs.Node | None  # None: the input is a graph input or constant (case 4)


@dataclass
class _Plan:
    bn: gs.Node
    producer: LinearProducer  # its weights and bias, read once by check
    scale: np.ndarray  # float64, per output channel
    shift: np.ndarray


def _statistics_outputs_used(graph: gs.Graph, bn: gs.Node) -> bool:
    for out in bn.outputs[1:]:
        if out.is_empty():
            continue
        if out.outputs or is_graph_output(graph, out):
            return True
    return False


def batchnorm_affine(bn: gs.Node, opset: int) -> tuple[np.ndarray, np.ndarray] | str:
    """The BN's per-channel (scale, shift) in float64, or why it is not an inference-mode affine."""
    if len(bn.inputs) != 5:
        return "BatchNormalization does not have 5 inputs"
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "BatchNormalization is in training mode"
    if opset < 7 and int(bn.attrs.get("is_test", 0)) != 1:
        return "BatchNormalization may be in training mode (is_test=0)"
    if int(bn.attrs.get("spatial", 1)) != 1:
        return "BatchNormalization with spatial=0 has per-location statistics"
    params = [const_value(t) for t in bn.inputs[1:]]
    if any(p is None for p in params):
        return "BatchNormalization parameters are not constant"
    gamma, beta, mean, var = (np.asarray(p) for p in params)
    if any(p.dtype not in FLOAT_DTYPES for p in (gamma, beta, mean, var)):
        return "BatchNormalization parameters are not floating point"
    if any(p.ndim != 1 or p.shape != gamma.shape for p in (gamma, beta, mean, var)):
        return "BatchNormalization parameters are not 1-D of one length"
    eps = float(bn.attrs.get("epsilon", 1e-5))
    denom = var.astype(np.float64) + eps
    if np.any(denom <= 0) or not all(np.all(np.isfinite(p)) for p in (gamma, beta, mean, denom)):
        return "BatchNormalization variance + epsilon is not positive and finite"
    scale = gamma.astype(np.float64) / np.sqrt(denom)
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale, shift


class FoldBatchNorm(Rule[_BatchNormMatch, _Plan]):
    """BatchNormalization after Conv/ConvTranspose/Gemm/2-D MatMul folds into its weights."""

    name = "fold-batchnorm"
    op_types = ("BatchNormalization",)

    def match(self, node: gs.Node, ctx: RuleContext) -> _BatchNormMatch | None:
        if not node.inputs:
            return None
        return _BatchNormMatch(node, producer_of(node.inputs[0]))

    def check(self, m: _BatchNormMatch, ctx: RuleContext) -> _Plan | Decline:
        producer = m.producer
        if not is_op(producer, *LINEAR_PRODUCERS):
            source = "a graph input or constant" if producer is None else producer.op
            return Decline(f"standalone BatchNormalization: input comes from {source}")
        if _statistics_outputs_used(ctx.graph, m.bn):
            return Decline("BatchNormalization statistics outputs are used")
        x = m.bn.inputs[0]
        if not only_consumer(ctx.graph, x, m.bn):
            return Decline(f"{producer.op} output has other readers or is a graph output")
        if not in_graph(ctx.graph, producer):
            return Decline(f"{producer.op} is in another graph scope")
        affine = batchnorm_affine(m.bn, ctx.opset)
        if isinstance(affine, str):
            return Decline(affine)
        lp = linear_producer(producer, ctx.opset)
        if isinstance(lp, str):
            return Decline(lp)
        scale, shift = affine
        if not scale_folds_allowed(ctx):
            return Decline(SCALE_FOLDS_OFF)
        if scale.shape != (lp.channels,):
            return Decline(
                f"BatchNormalization has {scale.shape[0]} channels, {producer.op} has {lp.channels}"
            )
        return _Plan(m.bn, lp, scale, shift)

    def rewrite(self, plan: _Plan, ctx: RuleContext) -> None:
        fold_output_affine(ctx.graph, plan.producer, plan.scale, plan.shift)
        out = plan.bn.outputs[0]
        x = plan.bn.inputs[0]
        detach(plan.bn)
        replace_all_uses(ctx.graph, out, x)


RULES: list[Rule] = [FoldBatchNorm()]
