"""Fuse a decomposed GELU into one Gelu node (opset 20).

Exporters write GELU out in one of two forms:

    erf:   y = x * 0.5 * (1 + Erf(x / sqrt(2)))                              -> Gelu(x)
    tanh:  y = 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))      -> Gelu(x, approximate="tanh")

Cases (the code's comments refer to them):

1. The erf argument: `Div(x, c)` or `Mul(x, c)` (either operand order), c = sqrt(2) or 1/sqrt(2).
2. The tanh argument: any Add/Sub/Mul/Div-by-constant/Pow tree that is a polynomial in x equal
   to sqrt(2/pi)*x + sqrt(2/pi)*0.044715*x^3 (`c*(x + d*Pow(x, 3))`, `c*x + e*x*x*x`, ...); x
   is the tensor cubed (`Pow(x, 3)`) or squared (`Mul(x, x)`).
3. `1 + Erf(.)` / `1 + Tanh(.)`: an Add of the constant 1, either operand order.
4. The product: a chain of Mul and Div-by-constant nodes, in any association order
   (`Mul(Mul(x, 0.5), a)`, `Mul(x, Mul(0.5, a))`, `Mul(Mul(x, a), 0.5)`, `Div(Mul(x, a), 2)`,
   ...), holding x once and scalar constants multiplying to 0.5.
5. Constants may be scalars or shape-[1] tensors; sqrt(2), sqrt(2/pi) and 0.044715 match with a
   relative tolerance of 2e-4 (exporters round them: 1.4142, 0.7071), 1 and 0.5 with 1e-5.
6. Every intermediate is read only inside the pattern and none is a graph output. Below opset
   20 the rule declines ("Gelu needs opset 20"); `optimize --opset 20` lets it fire.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    detach,
    is_op,
    make_variable,
    producer_of,
    readers,
    replace_all_uses,
    scalar_constant,
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

_MIN_OPSET = 20
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715
_LOOSE = 2e-4  # case 5: rounded irrational constants
_TIGHT = 1e-5


@dataclass
class _Argument:
    """The argument of Erf/Tanh as a polynomial in x, with the nodes that compute it."""

    x: gs.Tensor
    coefficients: dict[int, float]
    nodes: list[gs.Node] = field(default_factory=list)
    const_rank: int = 0


def _erf_argument(arg: gs.Tensor) -> _Argument | None:
    """Case 1: x * c or x / c."""
    producer = producer_of(arg)
    if not is_op(producer, "Mul", "Div") or len(producer.inputs) != 2 or len(producer.outputs) != 1:
        return None
    first, second = (scalar_constant(t) for t in producer.inputs)
    if second is not None and first is None:
        if producer.op == "Div" and second[0] == 0.0:
            return None
        k = second[0] if producer.op == "Mul" else 1.0 / second[0]
        return _Argument(producer.inputs[0], {1: k}, [producer], second[1])
    if first is not None and second is None and producer.op == "Mul":
        return _Argument(producer.inputs[1], {1: first[0]}, [producer], first[1])
    return None


def _cubed_tensor(arg: gs.Tensor, max_depth: int = 5) -> gs.Tensor | None:
    """Case 2: the t of the first Pow(t, 3) or Mul(t, t) found breadth-first above `arg`."""
    queue = deque([(arg, 0)])
    while queue:
        tensor, depth = queue.popleft()
        producer = producer_of(tensor)
        if not is_op(producer, "Add", "Sub", "Mul", "Div", "Pow") or len(producer.inputs) != 2:
            continue
        if producer.op == "Pow":
            exponent = scalar_constant(producer.inputs[1])
            if exponent is not None and exponent[0] == 3.0:
                return producer.inputs[0]
        if producer.op == "Mul" and producer.inputs[0] is producer.inputs[1]:
            return producer.inputs[0]
        if depth < max_depth:
            queue.extend((t, depth + 1) for t in producer.inputs)
    return None


def _polynomial(tensor: gs.Tensor, argument: _Argument, depth: int = 8) -> dict[int, float] | None:
    """Case 2: `tensor` as {power: coefficient} in argument.x; records nodes and constant ranks."""
    if tensor is argument.x:
        return {1: 1.0}
    scalar = scalar_constant(tensor)
    if scalar is not None:
        argument.const_rank = max(argument.const_rank, scalar[1])
        return {0: scalar[0]}
    producer = producer_of(tensor)
    if depth == 0 or not is_op(producer, "Add", "Sub", "Mul", "Div", "Pow"):
        return None
    if len(producer.inputs) != 2 or len(producer.outputs) != 1:
        return None
    if any(n is producer for n in argument.nodes):
        return None  # a shared subexpression; not a plain tree
    argument.nodes.append(producer)
    left = _polynomial(producer.inputs[0], argument, depth - 1)
    if left is None:
        return None
    if producer.op == "Pow":
        exponent = scalar_constant(producer.inputs[1])
        if exponent is None or exponent[0] not in (1.0, 2.0, 3.0):
            return None
        result = {0: 1.0}
        for _ in range(int(exponent[0])):
            result = _times(result, left)
        return result
    if producer.op == "Div":
        divisor = scalar_constant(producer.inputs[1])
        if divisor is None or divisor[0] == 0.0:
            return None
        argument.const_rank = max(argument.const_rank, divisor[1])
        return {p: c / divisor[0] for p, c in left.items()}
    right = (
        left
        if producer.inputs[1] is producer.inputs[0]
        else _polynomial(producer.inputs[1], argument, depth - 1)
    )
    if right is None:
        return None
    if producer.op == "Mul":
        return _times(left, right)
    sign = 1.0 if producer.op == "Add" else -1.0
    total = dict(left)
    for p, c in right.items():
        total[p] = total.get(p, 0.0) + sign * c
    return total


def _times(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    product: dict[int, float] = {}
    for pa, ca in a.items():
        for pb, cb in b.items():
            product[pa + pb] = product.get(pa + pb, 0.0) + ca * cb
    return product


def _tanh_argument(arg: gs.Tensor) -> _Argument | None:
    """Case 2: the polynomial argument of Tanh."""
    x = _cubed_tensor(arg)
    if x is None:
        return None
    argument = _Argument(x, {})
    coefficients = _polynomial(arg, argument)
    if coefficients is None:
        return None
    argument.coefficients = {p: c for p, c in coefficients.items() if c != 0.0}
    return argument


@dataclass
class _GeluMatch:
    """The matched nodes, the constants to verify, and the chain whose end the Gelu replaces."""

    approximate: str
    argument: _Argument
    one: float
    one_rank: int
    chain: ProductChain
    nodes: list[gs.Node]
    inner: list[gs.Tensor]


class FuseGelu(Rule[_GeluMatch, _GeluMatch]):
    """Cases 1-6: decomposed erf or tanh GELU -> Gelu."""

    name = "fuse-gelu"
    op_types = ("Erf", "Tanh")
    min_opset = _MIN_OPSET
    # each decomposed GELU below opset 20 is counted with its reason
    matches_below_min_opset = True

    def match(self, node: gs.Node, ctx: RuleContext) -> _GeluMatch | None:
        """Walk back from Erf/Tanh (anchor) to x, then forward through `1 + .` and the product."""
        arg = node.inputs[0]
        argument = _erf_argument(arg) if node.op == "Erf" else _tanh_argument(arg)
        if argument is None:
            return None
        core = node.outputs[0]
        for add in readers(core):  # case 3
            if not is_op(add, "Add") or len(add.inputs) != 2 or len(add.outputs) != 1:
                continue
            other = add.inputs[1] if add.inputs[0] is core else add.inputs[0]
            one = scalar_constant(other)
            if one is None or other is core:
                continue
            chains = [
                c for c in product_chains(ctx.graph, add.outputs[0]) if c.factor is argument.x
            ]  # case 4
            if not chains:
                continue
            chain = next((c for c in chains if close(c.scale, 0.5, _TIGHT)), chains[0])
            nodes = [*argument.nodes, node, add, *chain.nodes]
            inner = [
                arg,
                core,
                *(t for n in argument.nodes for t in n.outputs if t is not arg),
                *chain.inner,
            ]
            approximate = "none" if node.op == "Erf" else "tanh"
            return _GeluMatch(approximate, argument, one[0], one[1], chain, nodes, inner)
        return None

    def check(self, match: _GeluMatch, ctx: RuleContext) -> _GeluMatch | Decline:
        """Constants, readers, dtype, opset, then that no constant lifts the rank.

        The match is the plan: the rewrite needs nothing the checks compute.
        """
        coefficients = match.argument.coefficients
        if match.approximate == "none":
            if not close(coefficients.get(1, 0.0), _INV_SQRT2, _LOOSE):
                return Decline("Erf argument is not x/sqrt(2)")
        elif (
            set(coefficients) != {1, 3}
            or not close(coefficients[1], _SQRT_2_OVER_PI, _LOOSE)
            or not close(coefficients[3] / coefficients[1], _CUBIC, _LOOSE)
        ):
            return Decline("Tanh argument is not sqrt(2/pi)*(x + 0.044715*x^3)")
        if not close(match.one, 1.0, _TIGHT):
            return Decline("the constant added to Erf/Tanh is not 1")
        if not close(match.chain.scale, 0.5, _TIGHT):
            return Decline("the product's constants do not multiply to 0.5")
        x = match.argument.x
        reason = (
            escaping_reason(ctx.graph, match.inner, match.nodes)  # case 6
            or float_dtype_reason(x, match.chain.end)
            or (f"Gelu needs opset {_MIN_OPSET}" if ctx.opset < _MIN_OPSET else None)
            or rank_reason(
                max(match.argument.const_rank, match.chain.const_rank, match.one_rank), x
            )
        )
        return plan_or_decline(reason, match)

    def rewrite(self, match: _GeluMatch, ctx: RuleContext) -> None:
        """One Gelu node replaces the pattern."""
        graph, x, end = ctx.graph, match.argument.x, match.chain.end
        out = make_variable(graph, f"{end.name}_fused", like=end)
        attrs = {"approximate": "tanh"} if match.approximate == "tanh" else {}
        graph.nodes.append(
            gs.Node(
                "Gelu",
                name=unique_name(graph, f"{x.name}_gelu"),
                attrs=attrs,
                inputs=[x],
                outputs=[out],
            )
        )
        replace_all_uses(graph, end, out)
        for node in match.nodes:
            detach(node)


RULES: list[Rule] = [FuseGelu()]
