"""Fuse a decomposed layer normalization into one LayerNormalization node (opset 17).

Exporters that predate LayerNormalization (paddle2onnx, torch below opset 17) write it out:

    mean = ReduceMean(x, axes)             d   = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2), axes)     std = Sqrt(Add(var, eps))
    y    = Div(d, std) [* gamma] [+ beta]

which is `LayerNormalization(x, gamma, beta, axis=-len(axes), epsilon=eps)` when the axes are
the trailing axes of x. The fused op computes in float32 (stash_type 1), so float16 models gain
accuracy, never lose it.

Cases (the code's comments refer to them):

1. The mean and the variance: two ReduceMeans with keepdims=1 over the same trailing axes;
   axes are an attribute before opset 18 and a constant input from 18. The square is
   `Pow(d, 2)` or `Mul(d, d)`.
2. The standard deviation: `Sqrt(Add(var, eps))` or `Pow(Add(var, eps), 0.5)`, eps a scalar
   constant (either Add operand).
3. The normalization: `Div(d, std)` or `Mul(d, Reciprocal(std))`.
4. Gamma and beta: a following `Mul` by a constant, then an `Add` of a constant, each absorbed
   when it is the sole reader and its constant only varies along the normalized axes (its shape
   right-aligned with x, 1 on the other axes). No gamma: ones. No beta: the input is omitted.
   Scale and bias are materialized at the normalized shape, which must therefore be static.
5. Every intermediate is read only inside the pattern (d twice: by the square and by the
   normalization) and none is a graph output.
6. Below opset 17 the rule declines ("LayerNormalization needs opset 17"); raising the model's
   opset first (`optimize --opset 17`) lets it fire.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    const_value,
    detach,
    is_op,
    make_constant,
    make_variable,
    optional_input,
    readers,
    replace_all_uses,
    scalar_constant,
    sole_reader,
    unique_name,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext
from onnxshrink.engine.patterns import escaping_reason, float_dtype_reason

logger = logging.getLogger(__name__)

_MIN_OPSET = 17


def _reader(tensor: gs.Tensor, op: str, position: int | None = None) -> list[gs.Node]:
    """Readers of `tensor` with op `op` (reading it at input `position`, when given)."""
    return [
        n
        for n in readers(tensor)
        if is_op(n, op)
        and len(n.outputs) == 1
        and (position is None or (len(n.inputs) > position and n.inputs[position] is tensor))
    ]


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The other input of a binary node that reads `tensor` once."""
    if len(node.inputs) != 2 or (node.inputs[0] is tensor) == (node.inputs[1] is tensor):
        return None
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def _reduce_axes(node: gs.Node) -> tuple[list[int] | None, str | None]:
    """(axes, None) of a ReduceMean, or (None, reason); [] means all axes."""
    axes_input = optional_input(node, 1)
    if axes_input is not None:
        value = const_value(axes_input)
        if value is None:
            return None, "ReduceMean axes are not constant"
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    else:
        axes = [int(a) for a in node.attrs.get("axes", [])]
    if not axes and int(node.attrs.get("noop_with_empty_axes", 0)):
        return None, "ReduceMean reduces nothing (noop_with_empty_axes)"
    if int(node.attrs.get("keepdims", 1)) != 1:
        return None, "ReduceMean keepdims is not 1"
    return axes, None


def _trailing_count(axes: list[int], rank: int | None) -> int | None:
    """k when `axes` are the last k axes of a rank-`rank` tensor, else None."""
    if not axes:
        return rank  # all axes
    if rank is not None:
        normal = sorted({a + rank if a < 0 else a for a in axes})
        if (
            len(normal) != len(axes)
            or normal[0] < 0
            or normal != list(range(rank - len(normal), rank))
        ):
            return None
        return len(normal)
    if any(a >= 0 for a in axes):
        return None
    normal = sorted(set(axes))
    return (
        len(normal) if len(normal) == len(axes) and normal == list(range(-len(normal), 0)) else None
    )


def _affine_constant(tensor: gs.Tensor | None, x: gs.Tensor, k: int | None) -> np.ndarray | None:
    """Case 4: the constant's values over the normalized axes, when it varies along them only."""
    value = const_value(tensor)
    if value is None or k is None or x.shape is None or not np.issubdtype(value.dtype, np.floating):
        return None
    shape = _normalized_shape(x, k)
    if shape is None or value.ndim > len(x.shape):
        return None
    if any(d != 1 for d in value.shape[: max(value.ndim - k, 0)]):
        return None
    trailing = value.reshape(value.shape[max(value.ndim - k, 0) :])
    try:
        fits = np.broadcast_shapes(trailing.shape, shape) == shape
    except ValueError:
        fits = False
    return trailing if fits else None


@dataclass
class _LayerNormMatch:
    """The matched nodes and what the fused node needs."""

    x: gs.Tensor
    mean_node: gs.Node
    var_node: gs.Node
    square: gs.Node
    sqrt: gs.Node
    eps: gs.Tensor
    end: gs.Tensor
    gamma: np.ndarray | None
    beta: np.ndarray | None
    nodes: list[gs.Node]
    inner: list[gs.Tensor]
    k: int | None  # the mean's axes are the trailing k axes of x (None: they are not)
    axes_reason: str | None  # why the mean's axes are unusable, when they are


@dataclass
class _LayerNormPlan:
    """What check established: the normalized axes count, their static dims, epsilon."""

    match: _LayerNormMatch
    k: int  # the trailing k axes of x are normalized (axis = -k)
    shape: tuple[int, ...]  # their static dims, the shape of scale and bias
    epsilon: float


class FuseLayerNorm(Rule[_LayerNormMatch, _LayerNormPlan]):
    """Cases 1-6: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div [Mul Add] -> LayerNormalization."""

    name = "fuse-layernorm"
    op_types = ("ReduceMean",)
    min_opset = _MIN_OPSET
    # each decomposed LayerNorm below opset 17 is counted with its reason (case 6)
    matches_below_min_opset = True

    def match(self, node: gs.Node, ctx: RuleContext) -> _LayerNormMatch | None:
        """Walk forward from the mean ReduceMean (anchor) to the normalized output."""
        x, mean = node.inputs[0], node.outputs[0]
        for sub in _reader(mean, "Sub", 1):
            if sub.inputs[0] is not x:
                continue
            found = self._match_from_sub(ctx.graph, node, sub)
            if found is not None:
                return found
        return None

    def _match_from_sub(
        self, graph: gs.Graph, mean_node: gs.Node, sub: gs.Node
    ) -> _LayerNormMatch | None:
        x, d = mean_node.inputs[0], sub.outputs[0]
        squares = _reader(d, "Pow", 0) + [
            n for n in _reader(d, "Mul") if n.inputs[0] is d and n.inputs[1] is d
        ]
        for square in squares:  # case 1
            for var_node in _reader(square.outputs[0], "ReduceMean", 0):
                for add in _reader(var_node.outputs[0], "Add"):
                    eps = _other_input(add, var_node.outputs[0])
                    if eps is None:
                        continue
                    for sqrt in _reader(add.outputs[0], "Sqrt", 0) + _reader(
                        add.outputs[0], "Pow", 0
                    ):  # case 2
                        found = self._match_norm(
                            graph, mean_node, sub, square, var_node, add, eps, sqrt, x, d
                        )
                        if found is not None:
                            return found
        return None

    def _match_norm(
        self,
        graph: gs.Graph,
        mean_node: gs.Node,
        sub: gs.Node,
        square: gs.Node,
        var_node: gs.Node,
        add: gs.Node,
        eps: gs.Tensor,
        sqrt: gs.Node,
        x: gs.Tensor,
        d: gs.Tensor,
    ) -> _LayerNormMatch | None:
        std = sqrt.outputs[0]
        norm_nodes: list[gs.Node] = []
        for div in _reader(std, "Div", 1):  # case 3
            if div.inputs[0] is d:
                norm_nodes = [div]
                break
        else:
            for reciprocal in _reader(std, "Reciprocal", 0):
                muls = [
                    m
                    for m in _reader(reciprocal.outputs[0], "Mul")
                    if _other_input(m, reciprocal.outputs[0]) is d
                ]
                if muls:
                    norm_nodes = [reciprocal, muls[0]]
                    break
        if not norm_nodes:
            return None
        nodes = [mean_node, sub, square, var_node, add, sqrt, *norm_nodes]
        end = norm_nodes[-1].outputs[0]
        axes, axes_reason = _reduce_axes(mean_node)
        k = (
            _trailing_count(axes, len(x.shape) if x.shape is not None else None)
            if axes is not None
            else None
        )
        gamma = beta = None
        for op in ("Mul", "Add"):  # case 4, gamma before beta
            only = sole_reader(graph, end)
            if not is_op(only, op):
                continue
            value = _affine_constant(_other_input(only, end), x, k)
            if value is None or len(only.outputs) != 1:
                continue
            if op == "Mul":
                gamma = value
            else:
                beta = value
            nodes.append(only)
            end = only.outputs[0]
        inner = [t for n in nodes for t in n.outputs if t is not end]
        return _LayerNormMatch(
            x,
            mean_node,
            var_node,
            square,
            sqrt,
            eps,
            end,
            gamma,
            beta,
            nodes,
            inner,
            k,
            axes_reason,
        )

    def check(self, match: _LayerNormMatch, ctx: RuleContext) -> _LayerNormPlan | Decline:
        """Axes, exponents, eps, readers, dtype, opset, then a static normalized shape."""
        if match.axes_reason is not None:
            return Decline(match.axes_reason)
        var_axes, reason = _reduce_axes(match.var_node)
        if var_axes is None:
            return Decline(reason or "ReduceMean axes unknown")
        rank = len(match.x.shape) if match.x.shape is not None else None
        k = match.k
        if k is None:
            return Decline("ReduceMean axes are not the trailing axes")
        if _trailing_count(var_axes, rank) != k:  # the trailing k axes are one set
            return Decline("the two ReduceMeans reduce different axes")
        if match.square.op == "Pow":
            exponent = scalar_constant(match.square.inputs[1])
            if exponent is None or exponent[0] != 2.0:
                return Decline("square exponent is not 2")
        if match.sqrt.op == "Pow":
            exponent = scalar_constant(match.sqrt.inputs[1])
            if exponent is None or exponent[0] != 0.5:
                return Decline("square-root exponent is not 0.5")
        eps = scalar_constant(match.eps)
        if eps is None:
            return Decline("epsilon is not a scalar constant")
        reason = escaping_reason(ctx.graph, match.inner, match.nodes)  # case 5
        if reason is not None:
            return Decline(reason)
        reason = float_dtype_reason(match.x, match.end)
        if reason is not None:
            return Decline(reason)
        if ctx.opset < _MIN_OPSET:
            return Decline(f"LayerNormalization needs opset {_MIN_OPSET}")  # case 6
        shape = _normalized_shape(match.x, k)
        if not shape:
            return Decline("normalized dims of the input are not static (pin input shapes)")
        return _LayerNormPlan(match, k, shape, eps[0])

    def rewrite(self, plan: _LayerNormPlan, ctx: RuleContext) -> None:
        """One LayerNormalization with materialized scale (and bias) replaces the pattern."""
        match, shape = plan.match, plan.shape
        graph, x = ctx.graph, match.x
        dtype = np.dtype(x.dtype if x.dtype is not None else match.end.dtype)
        gamma = np.ones(shape) if match.gamma is None else match.gamma.astype(np.float64)
        scale = make_constant(
            graph, f"{x.name}_ln_scale", np.broadcast_to(gamma, shape).astype(dtype)
        )
        inputs: list[gs.Tensor] = [x, scale]
        if match.beta is not None:
            beta = np.broadcast_to(match.beta.astype(np.float64), shape).astype(dtype)
            inputs.append(make_constant(graph, f"{x.name}_ln_bias", beta))
        out = make_variable(graph, f"{match.end.name}_fused", like=match.end)
        graph.nodes.append(
            gs.Node(
                "LayerNormalization",
                name=unique_name(graph, f"{x.name}_layernorm"),
                attrs={"axis": -plan.k, "epsilon": plan.epsilon},
                inputs=inputs,
                outputs=[out],
            )
        )
        replace_all_uses(graph, match.end, out)
        for node in match.nodes:
            detach(node)


def _normalized_shape(x: gs.Tensor, k: int) -> tuple[int, ...] | None:
    """The static trailing k dims of x, else None."""
    if x.shape is None or k > len(x.shape):
        return None
    dims = tuple(x.shape[len(x.shape) - k :])
    return dims if all(isinstance(d, (int, np.integer)) and d > 0 for d in dims) else None


RULES: list[Rule] = [FuseLayerNorm()]
