"""No-op elimination: nodes whose output always equals their (first) input are bypassed.

Each rule recognises `y = Op(x, ...)` with `y == x` for every possible value of `x`, points the
readers of `y` at `x` and detaches the node. Cases, referred to by number in the code:

1. `Identity(x)`.
2. `Dropout(x)` at inference: opset < 7 with `is_test=1`; opsets 7-11 always; opset >= 12 with
   no `training_mode` input or a constant False one. Only when the mask output is unused.
3. `Cast(x, to=T)` with `x` already of type T; `CastLike(x, t)` with `t` of `x`'s type.
4. `Reshape(x, s)` where `s` resolves to `x`'s own shape (`reshape_is_noop`, case 4 of
   `onnxshrink.engine.patterns`). `Flatten(x, axis=1)` of a rank-2 `x`.
5. `Transpose(x, perm)` with `perm == [0, 1, ..., r-1]` (no perm: rank <= 1).
6. `Pad(x, pads)` with all pads zero (any mode).
7. `Expand(x, s)` where broadcasting `x` against `s` cannot grow it: `len(s) <= rank(x)` and
   each entry of `s` is 1 or equal to the static dim of `x` it aligns with.
   `Tile(x, repeats)` with all repeats 1.
8. `Slice(x, ...)` with step 1 whose every sliced axis starts at 0 and ends at or past the end
   (static dim, or an end >= INT32_MAX for a dynamic dim: no real dim is that large).
9. `x + 0`, `0 + x`, `x - 0`, `x * 1`, `1 * x`, `x / 1`, `x ^ 1` (never `0 - x` or `1 / x`):
   the constant must be all neutral, and broadcasting it must not change `x`'s shape: it is a
   scalar, or `rank(c) <= rank(x)` with each dim of `c` 1 or equal to `x`'s static dim.
10. `Concat` of a single input; `Sum`/`Max`/`Min`/`Mean` of a single input.
11. `Split` into a single output (its one split size can only be the whole axis).

Graph outputs: when `y` is an output of its graph and `x` is a graph input, a constant, another
graph output or read elsewhere, `replace_all_uses` keeps the output name with an Identity. The
Identity rule (case 1) therefore declines exactly that shape, or it would undo the Identity it
just left and loop forever. A no-op inside an If/Loop body whose output is the body's output
and whose input comes from the outer graph is left alone too (the outer producer cannot write
a body output).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    can_become_output,
    const_value,
    detach,
    input_or_attr,
    int_list,
    is_graph_output,
    onnx_dtype,
    optional_input,
    outer_scope_source,
    producer_of,
    replace_all_uses,
    tensor_dims,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext
from onnxshrink.engine.patterns import reshape_is_noop

logger = logging.getLogger(__name__)

#: an end index this large covers any real dim (case 8)
_END_OF_ANY_DIM = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Broadcasting (cases 7 and 9)


def broadcast_keeps_shape(x_dims: list[int | None] | None, c_shape: Sequence[int]) -> bool:
    """True when broadcasting a tensor of dims `x_dims` against shape `c_shape` leaves it as is."""
    if len(c_shape) == 0:
        return True
    if x_dims is None or len(c_shape) > len(x_dims):
        return False
    for c, x in zip(reversed(list(c_shape)), reversed(x_dims), strict=False):
        if c != 1 and (x is None or x != c):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The bypass machinery


@dataclass
class Bypass:
    """A no-op node: readers of `result` will read `source`."""

    node: gs.Node
    source: gs.Tensor
    result: gs.Tensor


@dataclass
class BypassPlan:
    """How the bypass keeps a graph output's name, as check found it."""

    bypass: Bypass
    #: `result` is a graph output that the source's producer can write itself (no Identity)
    producer_takes_output: bool


class _BypassRule(Rule[Bypass, BypassPlan]):
    """Base for the no-op rules: subclasses say whether a node is a no-op (`is_noop`)."""

    #: decline rather than leave an Identity to keep an output name (the Identity rule only)
    avoids_leftover_identity: bool = False

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        raise NotImplementedError

    def source_of(self, node: gs.Node) -> gs.Tensor:
        return node.inputs[0]

    def match(self, node: gs.Node, ctx: RuleContext) -> Bypass | None:
        if not node.inputs or node.inputs[0].is_empty() or not self.is_noop(node, ctx):
            return None
        return Bypass(node, self.source_of(node), node.outputs[0])

    def check(self, match: Bypass, ctx: RuleContext) -> BypassPlan | Decline:
        for extra in match.node.outputs[1:]:
            if not extra.is_empty() and (extra.outputs or is_graph_output(ctx.graph, extra)):
                return Decline("a second output is used")
        takes_output = False
        if is_graph_output(ctx.graph, match.result):
            if outer_scope_source(ctx.graph, match.source):
                return Decline("body output read from the outer scope")
            # the no-op itself is about to go, so it does not count as a reader of the source
            takes_output = can_become_output(ctx.graph, match.source, ignoring=match.node)
            if self.avoids_leftover_identity and not takes_output:
                # Bypassing would need an Identity to keep the output's name (module docstring).
                return Decline("graph output fed by a graph input, constant or shared tensor")
        return BypassPlan(match, takes_output)

    def rewrite(self, plan: BypassPlan, ctx: RuleContext) -> None:
        match = plan.bypass
        detach(match.node)  # first: the no-op must not count as a reader of the source
        if plan.producer_takes_output:
            # The source's producer writes the output tensor itself; readers of the output
            # (also readers of the source now) keep reading it.
            producer = producer_of(match.source)
            assert producer is not None  # can_become_output found it
            index = next(i for i, t in enumerate(producer.outputs) if t is match.source)
            producer.outputs[index] = match.result
            return
        replace_all_uses(ctx.graph, match.result, match.source)


class RemoveIdentity(_BypassRule):
    """Case 1: `Identity(x)` -> `x`, except an Identity that only keeps an output name."""

    name = "remove-identity"
    op_types = ("Identity",)

    avoids_leftover_identity = True

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        return True


class RemoveInferenceDropout(_BypassRule):
    """Case 2: `Dropout` in inference mode with an unused mask."""

    name = "remove-inference-dropout"
    op_types = ("Dropout",)

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        if ctx.opset < 7:
            return int(node.attrs.get("is_test", 0)) == 1
        if ctx.opset < 12 or optional_input(node, 2) is None:
            return True
        training = const_value(node.inputs[2])
        return training is not None and training.size == 1 and not bool(training.reshape(-1)[0])


class RemoveSameTypeCast(_BypassRule):
    """Case 3: `Cast` to the type the input already has; `CastLike` of the same type."""

    name = "remove-same-type-cast"
    op_types = ("Cast", "CastLike")

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        source = onnx_dtype(node.inputs[0])
        if source is None:
            return False
        if node.op == "Cast":
            return "to" in node.attrs and int(node.attrs["to"]) == source
        return len(node.inputs) > 1 and onnx_dtype(node.inputs[1]) == source


class RemoveSameShapeReshape(_BypassRule):
    """Case 4: `Reshape` to the input's own shape; `Flatten(axis=1)` of a rank-2 tensor."""

    name = "remove-same-shape-reshape"
    op_types = ("Reshape", "Flatten")

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        dims = tensor_dims(node.inputs[0])
        if dims is None:
            return False
        if node.op == "Flatten":
            return len(dims) == 2 and int(node.attrs.get("axis", 1)) in (1, -1)
        if ctx.opset < 5 or len(node.inputs) < 2:
            return False
        target = int_list(node.inputs[1])
        if target is None:
            return False
        return reshape_is_noop(dims, target, bool(node.attrs.get("allowzero", 0)))


class RemoveIdentityTranspose(_BypassRule):
    """Case 5: `Transpose` with the identity permutation."""

    name = "remove-identity-transpose"
    op_types = ("Transpose",)

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        perm = node.attrs.get("perm")
        if perm is None:
            dims = tensor_dims(node.inputs[0])
            return dims is not None and len(dims) <= 1
        return list(perm) == list(range(len(perm)))


class RemoveZeroPad(_BypassRule):
    """Case 6: `Pad` whose pads are all zero."""

    name = "remove-zero-pad"
    op_types = ("Pad",)

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        attr = "paddings" if ctx.opset < 2 else "pads"
        present, pads = input_or_attr(node, ctx.opset, 1, attr, input_since=11)
        return present and pads is not None and all(p == 0 for p in pads)


class RemoveNonGrowingExpand(_BypassRule):
    """Case 7: `Expand` to a shape the input already has; `Tile` by all ones."""

    name = "remove-non-growing-expand"
    op_types = ("Expand", "Tile")

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        if len(node.inputs) < 2:
            return False
        values = int_list(node.inputs[1])
        if values is None:
            return False
        if node.op == "Tile":
            return ctx.opset >= 6 and all(v == 1 for v in values)
        return broadcast_keeps_shape(tensor_dims(node.inputs[0]), values)


class RemoveFullSlice(_BypassRule):
    """Case 8: `Slice` that keeps every element of every sliced axis."""

    name = "remove-full-slice"
    op_types = ("Slice",)

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        dims = tensor_dims(node.inputs[0])
        if dims is None:
            return False
        if ctx.opset >= 10:
            starts = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
            ends = int_list(node.inputs[2]) if len(node.inputs) > 2 else None
            axes = _optional_ints(node, 3)
            steps = _optional_ints(node, 4)
            if axes is False or steps is False:
                return False
        else:
            starts = node.attrs.get("starts")
            ends = node.attrs.get("ends")
            axes = node.attrs.get("axes")
            steps = None
        if starts is None or ends is None or len(starts) != len(ends):
            return False
        axes = list(axes) if axes is not None else list(range(len(starts)))
        steps = list(steps) if steps is not None else [1] * len(starts)
        if len(axes) != len(starts) or len(steps) != len(starts):
            return False
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            if step != 1 or not -len(dims) <= axis < len(dims):
                return False
            dim = dims[axis]
            if dim is None:
                if start != 0 or end < _END_OF_ANY_DIM:
                    return False
                continue
            start = start + dim if start < 0 else start
            end = end + dim if end < 0 else end
            if max(start, 0) != 0 or end < dim:
                return False
        return True


def _optional_ints(node: gs.Node, index: int) -> list[int] | None | Literal[False]:
    """An optional constant int-list input: None when absent, False when not constant."""
    tensor = optional_input(node, index)
    if tensor is None:
        return None
    values = int_list(tensor)
    return False if values is None else values


_NEUTRAL = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1, "Pow": 1}
_COMMUTATIVE = {"Add", "Mul"}


class RemoveNeutralArithmetic(_BypassRule):
    """Case 9: `x + 0`, `x - 0`, `x * 1`, `x / 1`, `x ^ 1` that do not broadcast `x`."""

    name = "remove-neutral-arithmetic"
    op_types = tuple(_NEUTRAL)

    def match(self, node: gs.Node, ctx: RuleContext) -> Bypass | None:
        if len(node.inputs) != 2:
            return None
        slots = (1, 0) if node.op in _COMMUTATIVE else (1,)
        for slot in slots:
            source = node.inputs[1 - slot]
            constant = const_value(node.inputs[slot])
            if constant is None or constant.size == 0 or source.is_empty():
                continue
            neutral = _NEUTRAL[node.op]
            if constant.reshape(-1)[0] != neutral or not np.all(constant == neutral):
                continue
            if node.op != "Pow" and onnx_dtype(node.inputs[slot]) != onnx_dtype(source):
                continue
            if broadcast_keeps_shape(tensor_dims(source), constant.shape):
                return Bypass(node, source, node.outputs[0])
        return None


class RemoveSingleInputVariadic(_BypassRule):
    """Case 10: `Concat`, `Sum`, `Max`, `Min`, `Mean` of a single input."""

    name = "remove-single-input-variadic"
    op_types = ("Concat", "Sum", "Max", "Min", "Mean")

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        return len(node.inputs) == 1


class RemoveSingleOutputSplit(_BypassRule):
    """Case 11: `Split` into one output."""

    name = "remove-single-output-split"
    op_types = ("Split",)

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        return len(node.outputs) == 1


# Order does not matter for correctness: every rule only bypasses its own node.
RULES: list[Rule] = [
    RemoveIdentity(),
    RemoveInferenceDropout(),
    RemoveSameTypeCast(),
    RemoveSameShapeReshape(),
    RemoveIdentityTranspose(),
    RemoveZeroPad(),
    RemoveNonGrowingExpand(),
    RemoveFullSlice(),
    RemoveNeutralArithmetic(),
    RemoveSingleInputVariadic(),
    RemoveSingleOutputSplit(),
]
