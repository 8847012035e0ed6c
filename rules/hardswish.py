"""Fuse decomposed HardSigmoid and HardSwish back into the standard ONNX ops.

Exporters (paddle2onnx among them) write `hardswish(x) = x * relu6(x + 3) / 6` as four nodes
(Add, Clip, Mul, Div) and `hardsigmoid(x) = relu6(x + 3) / 6` as three. The algebra, for a clip
range [0, h] and a product k > 0 of scalar constants applied after the clip:

    k * clip(a*x + b, 0, h) = clip(k*a*x + k*b, 0, k*h)
                            = HardSigmoid(x, alpha=k*a, beta=k*b)        when k*h = 1
    x * HardSigmoid(x, alpha=1/6, beta=1/2) = HardSwish(x)               (opset 14)

Cases (the code's comments refer to them):

1. The clip: `Clip` with constant bounds (attributes `min`/`max` before opset 11, inputs from
   opset 11), or the Relu6 spellings `Min(Max(v, lo), hi)`, `Max(Min(v, hi), lo)`,
   `Min(Relu(v), hi)`. The lower bound must be 0 and the upper bound h > 0.
2. The affine input `v = a*x + b` of the clip: `Add(x, b)`, `Sub(x, -b)`, `Mul(x, a)`,
   `Div(x, 1/a)`, `Add(Mul(x, a), b)`. It is absorbed only when the clip is its sole reader;
   otherwise `v` itself is the x of the HardSigmoid (a = 1, b = 0).
3. The scale: a chain of Mul nodes and Div-by-constant nodes after the clip, in any association
   order (`Div(c, 6)`, `Mul(c, 1/6)`, `Div(Mul(y, c), 6)`, `Mul(y, Mul(c, 1/6))`,
   `Mul(Mul(y, 1/6), c)`...), whose scalar constants multiply to k = 1/h. The chain may hold one
   non-constant factor y: the x of a hardswish, or any other tensor (a gate). Constants may be
   scalars or shape-[1] tensors; values match with a relative tolerance of 1e-5.
4. The rewrite: no factor -> `HardSigmoid(x)`; factor y -> `Mul(y, HardSigmoid(x))`, which is the
   two-node HardSwish of opsets below 14 when y is x; y is x, opset >= 14 and
   (alpha, beta) = (1/6, 1/2) -> `HardSwish(x)`. When several chains complete the scale (in
   `Mul(x, Div(c, 6))` both `Div` alone and `Div` then `Mul` do), the one that takes in x wins,
   so that a whole hardswish goes in one step; a chain with a shared intermediate is passed
   over for a shorter one that has none.
5. An existing `Mul(x, HardSigmoid(x, 1/6, 1/2))` -> `HardSwish(x)` at opset >= 14.

Every tensor inside a pattern must be read only by the pattern and must not be a graph output;
the output dtype must be floating point. HardSigmoid with these attributes exists since opset 6.

Tolerances, product chains (case 3) and the reasons to decline come from
`onnxshrink.engine.patterns`, which the GELU and LayerNorm rules share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    detach,
    is_op,
    make_variable,
    producer_of,
    readers,
    replace_all_uses,
    scalar_constant,
    sole_reader,
    unique_name,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext, plan_or_decline
from onnxshrink.engine.patterns import (
    ProductChain,
    close,
    escaping_reason,
    float_dtype_reason,
    product_chains,
    rank_reason,
)

logger = logging.getLogger(__name__)

_RTOL = 1e-5  # case 3
_ATOL = 1e-7
_HARDSWISH_ALPHA = 1.0 / 6.0
_HARDSWISH_BETA = 0.5


def _hardswish_constants(alpha: float, beta: float) -> bool:
    """True for HardSigmoid's (alpha, beta) = (1/6, 1/2), which make x * it a HardSwish."""
    return close(alpha, _HARDSWISH_ALPHA, _RTOL, _ATOL) and close(
        beta, _HARDSWISH_BETA, _RTOL, _ATOL
    )


@dataclass
class _Clip:
    """clip(v, lo, hi) as spelled by `nodes` (case 1)."""

    v: gs.Tensor
    lo: float
    hi: float
    nodes: list[gs.Node]
    const_rank: int


def _bound(tensor: gs.Tensor | None, default: float) -> tuple[float, int] | None:
    if tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == ""):
        return default, 0
    return scalar_constant(tensor)


def _one_scalar(node: gs.Node) -> tuple[int, float, int] | None:
    """(index, value, rank) of the scalar constant when exactly one of two inputs is one."""
    first, second = (scalar_constant(t) for t in node.inputs)
    if first is not None and second is None:
        return 0, first[0], first[1]
    if second is not None and first is None:
        return 1, second[0], second[1]
    return None


def _match_clip(graph: gs.Graph, node: gs.Node) -> _Clip | None:
    """Case 1: the clip ending at `node`, with constant bounds."""
    if is_op(node, "Clip"):
        if len(node.inputs) > 1:
            lo_bound = _bound(node.inputs[1], -np.inf)
            hi_bound = _bound(node.inputs[2] if len(node.inputs) > 2 else None, np.inf)
        else:
            lo_bound = (float(node.attrs.get("min", -np.inf)), 0)
            hi_bound = (float(node.attrs.get("max", np.inf)), 0)
        if lo_bound is None or hi_bound is None:
            return None
        return _Clip(
            node.inputs[0], lo_bound[0], hi_bound[0], [node], max(lo_bound[1], hi_bound[1])
        )
    if not is_op(node, "Min", "Max") or len(node.inputs) != 2:
        return None
    outer_bound = _one_scalar(node)
    if outer_bound is None:
        return None
    const_at, value, rank = outer_bound
    inner_tensor = node.inputs[1 - const_at]
    inner = producer_of(inner_tensor)
    if inner is None or sole_reader(graph, inner_tensor) is None:
        return None
    if node.op == "Min" and is_op(inner, "Relu"):
        return _Clip(inner.inputs[0], 0.0, value, [inner, node], rank)
    wanted = "Max" if node.op == "Min" else "Min"
    if not is_op(inner, wanted) or len(inner.inputs) != 2:
        return None
    inner_bound = _one_scalar(inner)
    if inner_bound is None:
        return None
    inner_at, inner_value, inner_rank = inner_bound
    lo, hi = (inner_value, value) if node.op == "Min" else (value, inner_value)
    return _Clip(inner.inputs[1 - inner_at], lo, hi, [inner, node], max(rank, inner_rank))


def _match_affine(graph: gs.Graph, v: gs.Tensor, reader: gs.Node):
    """Case 2: (x, a, b, nodes, const rank) with v = a*x + b; absorbed only when `reader` alone reads v."""

    def scaled(t: gs.Tensor, node: gs.Node):
        producer = producer_of(t)
        if (
            sole_reader(graph, t) is not node
            or not is_op(producer, "Mul", "Div")
            or len(producer.inputs) != 2
        ):
            return t, 1.0, [], 0
        first, second = (scalar_constant(i) for i in producer.inputs)
        if producer.op == "Mul" and first is not None and second is None:
            return producer.inputs[1], first[0], [producer], first[1]
        if producer.op == "Mul" and second is not None and first is None:
            return producer.inputs[0], second[0], [producer], second[1]
        if producer.op == "Div" and first is None and second is not None and second[0] != 0.0:
            return producer.inputs[0], 1.0 / second[0], [producer], second[1]
        return t, 1.0, [], 0

    producer = producer_of(v)
    if (
        is_op(producer, "Add", "Sub")
        and sole_reader(graph, v) is reader
        and len(producer.inputs) == 2
    ):
        first, second = (scalar_constant(i) for i in producer.inputs)
        if second is not None and first is None:
            shift, rank = (second[0] if producer.op == "Add" else -second[0]), second[1]
            x, a, nodes, a_rank = scaled(producer.inputs[0], producer)
            return x, a, shift, [producer, *nodes], max(rank, a_rank)
        if first is not None and second is None and producer.op == "Add":
            x, a, nodes, a_rank = scaled(producer.inputs[1], producer)
            return x, a, first[0], [producer, *nodes], max(first[1], a_rank)
        return v, 1.0, 0.0, [], 0
    x, a, nodes, rank = scaled(v, reader)
    return x, a, 0.0, nodes, rank


@dataclass
class _HardSigmoidMatch:
    """k * clip(a*x + b, 0, 1/k) [* y]: the nodes, and alpha = k*a, beta = k*b."""

    x: gs.Tensor
    alpha: float
    beta: float
    chain: ProductChain
    nodes: list[gs.Node]
    inner: list[gs.Tensor]
    const_rank: int
    escaping: str | None  # why `inner` cannot disappear with `nodes` (match ranks by it)


@dataclass
class _HardSigmoidPlan:
    """The match, and the op that replaces it (case 4)."""

    match: _HardSigmoidMatch
    hardswish: bool  # True: HardSwish(x); False: HardSigmoid(x) [then Mul by the factor]


class FuseHardSigmoid(Rule[_HardSigmoidMatch, _HardSigmoidPlan]):
    """Cases 1-4: a scaled clip of an affine input becomes HardSigmoid (or HardSwish)."""

    name = "fuse-hard-sigmoid"
    op_types = ("Clip", "Min", "Max")
    min_opset = 6

    def match(self, node: gs.Node, ctx: RuleContext) -> _HardSigmoidMatch | None:
        """The clip anchored at `node`, its affine input and the scale chain after it."""
        clip = _match_clip(ctx.graph, node)  # case 1
        if (
            clip is None
            or not close(clip.lo, 0.0, _RTOL, atol=1e-6)
            or not clip.hi > 0.0
            or not np.isfinite(clip.hi)
        ):
            return None
        x, a, b, affine_nodes, affine_rank = _match_affine(
            ctx.graph, clip.v, clip.nodes[0]
        )  # case 2
        candidates = []
        for chain in product_chains(ctx.graph, node.outputs[0]):  # case 3
            if chain.scale <= 0.0 or not close(chain.scale * clip.hi, 1.0, _RTOL, _ATOL):
                continue
            nodes = [*affine_nodes, *clip.nodes, *chain.nodes]
            if len(nodes) < 2:
                continue  # a bare Clip(x, 0, 1) gains nothing as HardSigmoid
            inner = [t for n in [*affine_nodes, *clip.nodes[:-1]] for t in n.outputs] + chain.inner
            candidates.append(
                _HardSigmoidMatch(
                    x=x,
                    alpha=chain.scale * a,
                    beta=chain.scale * b,
                    chain=chain,
                    nodes=nodes,
                    inner=inner,
                    const_rank=max(clip.const_rank, affine_rank, chain.const_rank),
                    escaping=escaping_reason(ctx.graph, inner, nodes),
                )
            )
        if not candidates:
            return None
        # Prefer a chain that can be rewritten, and among those one that takes in the x factor
        # (a whole hardswish in one step), then one without a factor (a plain hard sigmoid);
        # when none can be rewritten, the first one says why in check().
        clean = [m for m in candidates if m.escaping is None]
        for wanted in (
            lambda m: m.chain.factor is m.x,
            lambda m: m.chain.factor is None,
            lambda m: True,
        ):
            found = next((m for m in clean if wanted(m)), None)
            if found is not None:
                return found
        return candidates[0]

    def check(self, match: _HardSigmoidMatch, ctx: RuleContext) -> _HardSigmoidPlan | Decline:
        """Intermediates must die with the pattern; float input; no rank change."""
        reason = (
            match.escaping
            or float_dtype_reason(match.x, match.chain.end)
            or rank_reason(match.const_rank, match.x, match.chain.factor)
        )
        if reason is not None:
            return Decline(reason)
        x, factor = match.x, match.chain.factor
        # `factor is not None` first: `factor is x` alone makes mypy narrow x to Optional
        hardswish = (
            factor is not None
            and factor is x
            and _hardswish_constants(match.alpha, match.beta)
            and ctx.opset >= 14
        )
        return _HardSigmoidPlan(match, hardswish)

    def rewrite(self, plan: _HardSigmoidPlan, ctx: RuleContext) -> None:
        """Case 4: HardSigmoid, Mul(y, HardSigmoid) or HardSwish in place of the chain's end."""
        match = plan.match
        graph, x, end, factor = ctx.graph, match.x, match.chain.end, match.chain.factor
        out = make_variable(graph, f"{end.name}_fused", like=end)
        if plan.hardswish:
            graph.nodes.append(
                gs.Node(
                    "HardSwish",
                    name=unique_name(graph, f"{x.name}_hardswish"),
                    inputs=[x],
                    outputs=[out],
                )
            )
        else:
            hs_out = (
                out if factor is None else make_variable(graph, f"{x.name}_hardsigmoid", like=x)
            )
            graph.nodes.append(
                gs.Node(
                    "HardSigmoid",
                    name=unique_name(graph, f"{x.name}_hardsigmoid"),
                    attrs={"alpha": float(match.alpha), "beta": float(match.beta)},
                    inputs=[x],
                    outputs=[hs_out],
                )
            )
            if factor is not None:
                graph.nodes.append(
                    gs.Node(
                        "Mul",
                        name=unique_name(graph, f"{end.name}_mul"),
                        inputs=[factor, hs_out],
                        outputs=[out],
                    )
                )
        replace_all_uses(graph, end, out)
        for node in match.nodes:
            detach(node)


@dataclass
class _HardSwishMatch:
    """Mul(x, HardSigmoid(x, 1/6, 1/2))."""

    x: gs.Tensor
    hard_sigmoid: gs.Node
    mul: gs.Node


class FuseHardSwish(Rule[_HardSwishMatch, _HardSwishMatch]):
    """Case 5: Mul(x, HardSigmoid(x, 1/6, 1/2)) becomes HardSwish(x)."""

    name = "fuse-hard-swish"
    op_types = ("HardSigmoid",)
    min_opset = 14

    def match(self, node: gs.Node, ctx: RuleContext) -> _HardSwishMatch | None:
        """A standard HardSigmoid whose output is multiplied by its own input."""
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        if not _hardswish_constants(alpha, beta):
            return None
        x, hs_out = node.inputs[0], node.outputs[0]
        for reader in readers(hs_out):
            if is_op(reader, "Mul") and len(reader.inputs) == 2:
                other = reader.inputs[1] if reader.inputs[0] is hs_out else reader.inputs[0]
                if other is x:
                    return _HardSwishMatch(x, node, reader)
        return None

    def check(self, match: _HardSwishMatch, ctx: RuleContext) -> _HardSwishMatch | Decline:
        """The HardSigmoid output must be read by the Mul alone."""
        reason = escaping_reason(ctx.graph, match.hard_sigmoid.outputs, [match.mul])
        return plan_or_decline(reason, match)

    def rewrite(self, match: _HardSwishMatch, ctx: RuleContext) -> None:
        """One HardSwish node replaces the pair."""
        graph, end = ctx.graph, match.mul.outputs[0]
        out = make_variable(graph, f"{end.name}_fused", like=end)
        graph.nodes.append(
            gs.Node(
                "HardSwish",
                name=unique_name(graph, f"{match.x.name}_hardswish"),
                inputs=[match.x],
                outputs=[out],
            )
        )
        replace_all_uses(graph, end, out)
        detach(match.mul)
        detach(match.hard_sigmoid)


# The decomposed form first: it rewrites whole quads at once (straight to HardSwish at opset 14),
# so FuseHardSwish only meets HardSigmoids that were in the model already.
RULES: list[Rule] = [FuseHardSigmoid(), FuseHardSwish()]
