"""Pattern-matching helpers that several rule families share.

Rule modules import these from here rather than from each other. They answer what a rule asks
of a candidate match, and run the matchers that more than one rule needs. Cases (the code's
comments and docstrings refer to them):

1. Tolerances (`close`): a constant the model holds against the one the pattern expects
   (exporters round 1/6, sqrt(2)...), relative to the expected value.
2. Reasons to decline, each None when the candidate qualifies: `escaping_reason` (a tensor that
   must disappear with the pattern is a graph output or has readers outside it), `rank_reason`
   (dropping shape-[1] constants could change the output's rank), `float_dtype_reason` (the
   input is not floating point). HardSigmoid/HardSwish, GELU and LayerNorm fusion use them.
3. Product chains (`product_chains`, `ProductChain`): from a tensor, every chain of Mul nodes
   and Div-by-constant nodes that continues it, in any association order (`Div(c, 6)`,
   `Mul(c, 1/6)`, `Div(Mul(y, c), 6)`, `Mul(y, Mul(c, 1/6))`, `Mul(Mul(y, 1/6), c)`...), read
   as `end = start * scale * factor`: the scalar constants (scalars or shape-[1] tensors)
   multiply into `scale`, and at most one non-constant operand is the `factor`. The HardSigmoid
   rule finds the scale after its clip this way, the GELU rule its product x * 0.5 * (1 + erf).
4. Reshape no-ops (`reshape_is_noop`): `Reshape(x, s)` returns x's own shape when every entry
   of s equals the input dim, or is 0 (copy, `allowzero=0`), with at most one -1 (which then
   can only be the remaining dim). The no-op and reshape-merging rules use it.
5. Constants read from several graph scopes (`may_share`): onnx-graphsurgeon exports an
   initializer into every graph that reads it (the outer graph and If/Loop bodies), so such a
   constant is stored once per graph; one larger than `MAX_SHARED_CONSTANT_BYTES` stays a
   Constant node instead. Dead-code removal and constant folding use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    is_graph_output,
    is_op,
    producer_of,
    readers,
    scalar_constant,
    sole_reader,
)

#: a constant read from several graphs is copied into each; only small ones become
#: initializers (case 5)
MAX_SHARED_CONSTANT_BYTES = 256


def close(value: float, target: float, rtol: float, atol: float = 0.0) -> bool:
    """True when `value` is within `atol + rtol * |target|` of `target` (case 1).

    For constants that exporters round (1/6, sqrt(2)...). The tolerance scales with `target`,
    the value the pattern expects, not with the value the model holds.
    """
    return abs(value - target) <= atol + rtol * abs(target)


def escaping_reason(graph: gs.Graph, inner: list[gs.Tensor], nodes: list[gs.Node]) -> str | None:
    """Why the tensors `inner` cannot disappear with `nodes`, or None when they can (case 2)."""
    ids = {id(n) for n in nodes}
    for tensor in inner:
        if is_graph_output(graph, tensor):
            return "intermediate tensor is a graph output"
        if any(id(r) not in ids for r in readers(tensor)):
            return "intermediate tensor has readers outside the pattern"
    return None


def rank_reason(const_rank: int, *tensors: gs.Tensor | None) -> str | None:
    """Case 2: why dropping constants of rank `const_rank` might change the output shape, or None.

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
    """Case 3: `end = start * scale * factor`, through the Mul and Div-by-constant `nodes`.

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


def reshape_is_noop(dims: list[int | None], target: list[int], allowzero: bool) -> bool:
    """True when Reshape(x, target) returns x's own shape (dims: None where symbolic; case 4)."""
    if len(target) != len(dims):
        return False
    inferred = 0
    for dim, entry in zip(dims, target, strict=True):
        if entry == 0 and not allowzero:
            continue  # copies the input dim
        if entry == -1:
            inferred += 1
            continue
        if dim is None or dim != entry:
            return False
    # With every other entry equal to its input dim, a single -1 can only infer the last one.
    return inferred <= 1


def may_share(tensor: gs.Tensor, nbytes: int, owners: dict[int, int]) -> bool:
    """Case 5: True when `tensor` may be an initializer without copying many bytes.

    gs exports a constant into every graph that reads it, so a constant read from several
    graphs (say both branches of an If) is stored once per graph. `owners` comes from
    `onnxshrink.engine.graph.node_owners`.
    """
    graphs = {owners.get(id(reader), -1) for reader in tensor.outputs}
    return len(graphs) <= 1 or nbytes <= MAX_SHARED_CONSTANT_BYTES
