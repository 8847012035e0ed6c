"""Fuse a bias Add into Gemm: MatMul + Add(const) -> Gemm, Gemm + Add(const) -> Gemm.

Gemm computes `Y = alpha * A' @ B' + beta * C` for 2-D A and B, with C unidirectionally
broadcastable to Y's shape [M, N] (opset >= 7).

1. `Add(MatMul(A, B), C)` (either operand order) with A and B known to be 2-D and C a constant of
   rank <= 2 whose dims, right-aligned to [M, N], are each 1 or equal to M resp. N:
   `Gemm(A, B, C)` (alpha = beta = 1). M or N must be known where C does not broadcast.
   A MatMul with a higher-rank A (batched, e.g. [B, T, K] @ [K, N]) is left alone: Gemm is
   2-D only, and reshaping around it would add nodes.
2. `Add(Gemm(A, B, C), D)` with D such a constant and C constant or absent:
   `Gemm(A, B, beta * C + D)` with beta' = 1.

Preconditions: the MatMul/Gemm output is read only by the Add and is not a graph output; both
nodes are in the same graph; floating-point dtype (float16/32/64: Gemm's types since opset 7);
the constant has the dtype of the product.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.affine import FLOAT_DTYPES, folded_name
from onnxshrink.engine.graph import (
    const_value,
    detach,
    first_dtype,
    in_graph,
    is_op,
    known_shape,
    make_constant,
    only_consumer,
    optional_input,
    producer_of,
    replace_all_uses,
    set_input,
    unique_name,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext, plan_or_decline

logger = logging.getLogger(__name__)


@dataclass
class _BiasAddMatch:
    add: gs.Node
    product: gs.Node  # the MatMul or Gemm
    bias: gs.Tensor  # the constant operand of the Add


@dataclass
class _GemmBiasPlan:
    add: gs.Node
    gemm: gs.Node
    c: gs.Tensor | None  # the Gemm's C input, if any
    new_c: np.ndarray  # beta * C + D, in the Gemm's dtype


def bias_broadcast_reason(bias: np.ndarray, m: object, n: object) -> str | None:
    """None when `bias` broadcasts unidirectionally to [m, n] (m, n: int, or symbolic/None)."""
    if bias.ndim > 2:
        return f"bias of rank {bias.ndim} does not broadcast to the 2-D Gemm output"
    shape = (1,) * (2 - bias.ndim) + bias.shape
    for dim, target, axis in ((shape[0], m, "M"), (shape[1], n, "N")):
        if dim == 1:
            continue
        if not isinstance(target, int) or dim != target:
            return f"bias dim {dim} does not match {axis}={target}"
    return None


def _match_bias_add(node: gs.Node, ops: tuple[str, ...]) -> _BiasAddMatch | None:
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    for i in (0, 1):
        product = producer_of(node.inputs[i])
        other = node.inputs[1 - i]
        if is_op(product, *ops) and const_value(other) is not None:
            return _BiasAddMatch(node, product, other)
    return None


def _common_reason(m: _BiasAddMatch, ctx: RuleContext) -> str | None:
    out = m.product.outputs[0] if len(m.product.outputs) == 1 else None
    if out is None or not only_consumer(ctx.graph, out, m.add):
        return f"{m.product.op} output has other readers or is a graph output"
    if not in_graph(ctx.graph, m.product):
        return f"{m.product.op} is in another graph scope"
    return None


class MatMulAddToGemm(Rule[_BiasAddMatch, _BiasAddMatch]):
    """MatMul(A, B) + constant C with 2-D A and B becomes Gemm(A, B, C) (case 1)."""

    name = "matmul-add-to-gemm"
    op_types = ("Add",)
    min_opset = 7

    def match(self, node: gs.Node, ctx: RuleContext) -> _BiasAddMatch | None:
        return _match_bias_add(node, ("MatMul",))

    def check(self, m: _BiasAddMatch, ctx: RuleContext) -> _BiasAddMatch | Decline:
        reason = _common_reason(m, ctx)
        if reason is not None:
            return Decline(reason)
        a, b = m.product.inputs
        a_dims, b_dims = known_shape(a), known_shape(b)
        if a_dims is None or len(a_dims) != 2:
            return Decline("MatMul input A is not known to be 2-D (batched MatMul stays)")
        if b_dims is None or len(b_dims) != 2:
            return Decline("MatMul input B is not known to be 2-D")
        bias = np.asarray(const_value(m.bias))
        dtype = first_dtype(b, a)
        if dtype not in FLOAT_DTYPES or bias.dtype != dtype:
            return Decline(f"dtype {dtype} / bias {bias.dtype} is not a matching float type")
        # the bias tensor itself becomes C: nothing computed here is needed again
        return plan_or_decline(bias_broadcast_reason(bias, a_dims[0], b_dims[1]), m)

    def rewrite(self, m: _BiasAddMatch, ctx: RuleContext) -> None:
        a, b = m.product.inputs
        out = m.add.outputs[0]
        name = unique_name(ctx.graph, m.product.name or "gemm")
        detach(m.product)
        detach(m.add)
        ctx.graph.nodes.append(gs.Node("Gemm", name=name, inputs=[a, b, m.bias], outputs=[out]))


class GemmAddFold(Rule[_BiasAddMatch, _GemmBiasPlan]):
    """Gemm(A, B, C) + constant D becomes Gemm(A, B, beta * C + D) (case 2)."""

    name = "gemm-add-fold"
    op_types = ("Add",)
    min_opset = 7

    def match(self, node: gs.Node, ctx: RuleContext) -> _BiasAddMatch | None:
        return _match_bias_add(node, ("Gemm",))

    def check(self, m: _BiasAddMatch, ctx: RuleContext) -> _GemmBiasPlan | Decline:
        reason = _common_reason(m, ctx)
        if reason is not None:
            return Decline(reason)
        gemm = m.product
        if len(gemm.inputs) < 2:
            return Decline("Gemm has fewer than 2 inputs")
        c_tensor = optional_input(gemm, 2)
        c = None
        if c_tensor is not None:
            c = const_value(c_tensor)
            if c is None:
                return Decline("Gemm C is not a constant")
            c = np.asarray(c)
        d = np.asarray(const_value(m.bias))
        dtype = c.dtype if c is not None else first_dtype(gemm.inputs[1], gemm.inputs[0])
        if dtype not in FLOAT_DTYPES or d.dtype != dtype:
            return Decline(f"dtype {dtype} / bias {d.dtype} is not a matching float type")
        m_dim, n_dim = self._output_dims(gemm)
        reason = bias_broadcast_reason(d, m_dim, n_dim)
        if reason is not None:
            return Decline(reason)
        beta = float(gemm.attrs.get("beta", 1.0))
        new_c = (
            d.astype(np.float64)
            if c is None
            else beta * c.astype(np.float64) + d.astype(np.float64)
        )
        return _GemmBiasPlan(m.add, gemm, c_tensor, new_c.astype(dtype))

    @staticmethod
    def _output_dims(gemm: gs.Node) -> tuple[object, object]:
        out_shape = gemm.outputs[0].shape
        if out_shape is not None and len(out_shape) == 2:
            return out_shape[0], out_shape[1]
        a_dims, b_dims = known_shape(gemm.inputs[0]), known_shape(gemm.inputs[1])
        m_dim = n_dim = None
        if a_dims is not None and len(a_dims) == 2:
            m_dim = a_dims[1] if gemm.attrs.get("transA", 0) else a_dims[0]
        if b_dims is not None and len(b_dims) == 2:
            n_dim = b_dims[0] if gemm.attrs.get("transB", 0) else b_dims[1]
        return m_dim, n_dim

    def rewrite(self, plan: _GemmBiasPlan, ctx: RuleContext) -> None:
        gemm = plan.gemm
        hint = plan.c.name if plan.c is not None else f"{gemm.inputs[1].name}_bias"
        set_input(gemm, 2, make_constant(ctx.graph, folded_name(hint), plan.new_c))
        gemm.attrs["beta"] = 1.0
        out = plan.add.outputs[0]
        detach(plan.add)
        replace_all_uses(ctx.graph, out, gemm.outputs[0])


RULES: list[Rule] = [MatMulAddToGemm(), GemmAddFold()]
