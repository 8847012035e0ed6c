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

The helpers below (`close`, `product_chains`, `escaping_reason`, `rank_reason`,
`float_dtype_reason`) are shared with the GELU and LayerNorm rules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    detach,
    is_graph_output,
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

logger = logging.getLogger(__name__)

_RTOL = 1e-5  # case 3
_ATOL = 1e-7
_HARDSWISH_ALPHA = 1.0 / 6.0
_HARDSWISH_BETA = 0.5


def close(value: float, target: float, rtol: float, atol: float = 0.0) -> bool:
    """True when `value` is within `atol + rtol * |target|` of `target`.

    For constants that exporters round (1/6, sqrt(2)...). The tolerance scales with `target`,
    the value the pattern expects, not with the value the model holds.
    """
    return abs(value - target) <= atol + rtol * abs(target)


def _hardswish_constants(alpha: float, beta: float) -> bool:
    """True for HardSigmoid's (alpha, beta) = (1/6, 1/2), which make x * it a HardSwish."""
    return close(alpha, _HARDSWISH_ALPHA, _RTOL, _ATOL) and close(
        beta, _HARDSWISH_BETA, _RTOL, _ATOL
    )


def escaping_reason(graph: gs.Graph, inner: list[gs.Tensor], nodes: list[gs.Node]) -> str | None:
    """Why the tensors `inner` cannot disappear with `nodes`, or None when they can."""
    ids = {id(n) for n in nodes}
    for tensor in inner:
        if is_graph_output(graph, tensor):
            return "intermediate tensor is a graph output"
        if any(id(r) not in ids for r in readers(tensor)):
            return "intermediate tensor has readers outside the pattern"
    return None


def rank_reason(const_rank: int, *tensors: gs.Tensor | None) -> str | None:
    """Why dropping constants of rank `const_rank` might change the output shape, or None.

    Broadcasting against a shape-[1] constant lifts a rank-0 tensor to rank 1; the fused op
    would not.
    """
    if const_rank == 0:
        return None
    ranks = [len(t.shape) for t in tensors if t is not None and t.shape is not None]
    if not ranks:
        return "rank of the input unknown and a constant has rank >= 1"
    if const_rank > max(ranks):
        return "a constant has a higher rank than the input"
    return None


def float_dtype_reason(tensor: gs.Tensor, fallback: gs.Tensor | None = None) -> str | None:
    """Why `tensor` (or, when its dtype is unknown, `fallback`) is not floating point, or None."""
    dtype = tensor.dtype if tensor.dtype is not None else getattr(fallback, "dtype", None)
    if dtype is None:
        return "dtype of the input unknown"
    try:
        floating = np.issubdtype(np.dtype(dtype), np.floating)
    except TypeError:
        floating = False
    return None if floating else "input is not a floating-point tensor"


@dataclass
class ProductChain:
    """`end = start * scale * factor`, through the Mul and Div-by-constant nodes in `nodes`.

    `inner` are the chain's tensors before `end` (`start` included when the chain is not
    empty); `const_rank` is the highest rank among the absorbed constants.
    """

    start: gs.Tensor
    end: gs.Tensor
    scale: float = 1.0
    factor: gs.Tensor | None = None
    nodes: list[gs.Node] = field(default_factory=list)
    inner: list[gs.Tensor] = field(default_factory=list)
    const_rank: int = 0


def _flatten_product(graph: gs.Graph, tensor: gs.Tensor):
    """Split `tensor` into (scalar scale, non-constant leaves, nodes, const rank).

    Descends into Mul and Div-by-constant producers only while they are read by nothing else,
    so a tensor with other readers (like the x of a hardswish) stays a leaf.
    """
    scalar = scalar_constant(tensor)
    if scalar is not None:
        return scalar[0], [], [], scalar[1]
    producer = producer_of(tensor)
    single = sole_reader(graph, tensor) is not None
    if (
        single
        and is_op(producer, "Mul")
        and len(producer.inputs) == 2
        and len(producer.outputs) == 1
    ):
        left = _flatten_product(graph, producer.inputs[0])
        right = _flatten_product(graph, producer.inputs[1])
        return (
            left[0] * right[0],
            left[1] + right[1],
            [producer, *left[2], *right[2]],
            max(left[3], right[3]),
        )
    if single and is_op(producer, "Div") and len(producer.outputs) == 1:
        divisor = scalar_constant(producer.inputs[1])
        if divisor is not None and divisor[0] != 0.0:
            num = _flatten_product(graph, producer.inputs[0])
            return num[0] / divisor[0], num[1], [producer, *num[2]], max(num[3], divisor[1])
    return 1.0, [tensor], [], 0


def product_chains(graph: gs.Graph, start: gs.Tensor, max_nodes: int = 3) -> Iterator[ProductChain]:
    """Every chain of up to `max_nodes` Mul/Div(by constant) nodes that continues `start`.

    Chains come shortest first along each path, the empty chain first. Readers are followed
    whatever their number: callers check `inner` with `escaping_reason`, so that a pattern with
    a shared intermediate declines with a reason instead of not matching. Side operands of the
    Muls are flattened (`Mul(Mul(y, 1/6), c)`); a chain holds at most one non-constant factor.
    """

    def extend(chain: ProductChain) -> Iterator[ProductChain]:
        yield chain
        if len(chain.nodes) >= max_nodes:
            return
        for reader in readers(chain.end):
            if len(reader.outputs) != 1:
                continue
            if is_op(reader, "Mul") and len(reader.inputs) == 2:
                first, second = reader.inputs
                if first is chain.end and second is chain.end:
                    continue  # a square is not a scale
                side = second if first is chain.end else first
                scale, leaves, side_nodes, rank = _flatten_product(graph, side)
            elif (
                is_op(reader, "Div")
                and reader.inputs[0] is chain.end
                and reader.inputs[1] is not chain.end
            ):
                divisor = scalar_constant(reader.inputs[1])
                if divisor is None or divisor[0] == 0.0:
                    continue
                scale, leaves, side_nodes, rank = 1.0 / divisor[0], [], [], divisor[1]
            else:
                continue
            factors = [f for f in (chain.factor, *leaves) if f is not None]
            if len(factors) > 1:
                continue
            yield from extend(
                ProductChain(
                    start=chain.start,
                    end=reader.outputs[0],
                    scale=chain.scale * scale,
                    factor=factors[0] if factors else None,
                    nodes=[*chain.nodes, reader, *side_nodes],
                    inner=[*chain.inner, chain.end],
                    const_rank=max(chain.const_rank, rank),
                )
            )

    yield from extend(ProductChain(start=start, end=start))


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
