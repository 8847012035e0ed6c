"""No-op elimination: nodes whose output always equals their (first) input are bypassed.

Each rule recognises `y = Op(x, ...)` with `y == x` for every possible value of `x`, points the
readers of `y` at `x` and detaches the node. Cases, referred to by number in the code:

1. `Identity(x)`.
2. `Dropout(x)` at inference: opset < 7 with `is_test=1`; opsets 7-11 always; opset >= 12 with
   no `training_mode` input or a constant False one. Only when the mask output is unused.
3. `Cast(x, to=T)` with `x` already of type T; `CastLike(x, t)` with `t` of `x`'s type.
4. `Reshape(x, s)` where `s` resolves to `x`'s own shape: every entry equals the input dim, or
   is 0 (copy, `allowzero=0`), with at most one -1 (which then can only be the remaining dim).
   `Flatten(x, axis=1)` of a rank-2 `x`.
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

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

from onnxshrink.graph import const_value, detach, is_graph_output, producer_of, replace_all_uses
from onnxshrink.passes import Rule, RuleContext

logger = logging.getLogger(__name__)

#: an end index this large covers any real dim (case 8)
_END_OF_ANY_DIM = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Shared helpers (merge_reshapes uses them too)


def tensor_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """The dims of a tensor: an int where static, None where symbolic; None when rank unknown."""
    if isinstance(tensor, gs.Constant):
        return list(tensor.shape)
    shape = tensor.shape
    if shape is None:
        return None
    return [
        d if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None
        for d in shape
    ]


def onnx_dtype(tensor: gs.Tensor) -> int | None:
    """The ONNX element type of a tensor, or None when unknown."""
    if tensor.dtype is None:
        return None
    try:
        return int(dtype_to_onnx(tensor.dtype))
    except Exception:
        return None


def int_list(tensor: gs.Tensor | None) -> list[int] | None:
    """The values of a constant integer tensor of rank <= 1 as a list, else None."""
    value = const_value(tensor)
    if value is None or value.ndim > 1 or not np.issubdtype(value.dtype, np.integer):
        return None
    return [int(v) for v in np.asarray(value).reshape(-1)]


def input_or_attr(
    node: gs.Node, opset: int, index: int, attr: str, input_since: int
) -> tuple[bool, list[int] | None]:
    """An int-list operand that moved from an attribute to an input at opset `input_since`.

    Returns (present, values): present is False when neither is given (the operand's default
    applies); values is None when it is given but not constant.
    """
    if opset >= input_since:
        if len(node.inputs) <= index or node.inputs[index].is_empty():
            return False, None
        return True, int_list(node.inputs[index])
    if attr not in node.attrs:
        return False, None
    value = node.attrs[attr]
    return True, [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


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


class _BypassRule(Rule):
    """Base for the no-op rules: subclasses say whether a node is a no-op (`is_noop`)."""

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        raise NotImplementedError

    def source_of(self, node: gs.Node) -> gs.Tensor:
        return node.inputs[0]

    def match(self, node: gs.Node, ctx: RuleContext) -> Bypass | None:
        if not node.inputs or node.inputs[0].is_empty() or not self.is_noop(node, ctx):
            return None
        return Bypass(node, self.source_of(node), node.outputs[0])

    def check(self, match: Bypass, ctx: RuleContext) -> str | None:
        for extra in match.node.outputs[1:]:
            if not extra.is_empty() and (extra.outputs or is_graph_output(ctx.graph, extra)):
                return "a second output is used"
        if is_graph_output(ctx.graph, match.result):
            if outer_scope_source(ctx.graph, match.source):
                return "body output read from the outer scope"
            if self.keeps_identity(match, ctx):
                return "graph output fed by a graph input, constant or shared tensor"
        return None

    def keeps_identity(self, match: Bypass, ctx: RuleContext) -> bool:
        """Only the Identity rule must decline when bypassing would leave an Identity."""
        return False

    def rewrite(self, match: Bypass, ctx: RuleContext) -> None:
        detach(match.node)
        if is_graph_output(ctx.graph, match.result) and _can_rename(ctx.graph, match.source):
            # The source's producer writes the output tensor itself; readers of the output
            # (also readers of the source now) keep reading it.
            producer = producer_of(match.source)
            index = next(i for i, t in enumerate(producer.outputs) if t is match.source)
            producer.outputs[index] = match.result
            return
        replace_all_uses(ctx.graph, match.result, match.source)


def outer_scope_source(graph: gs.Graph, source: gs.Tensor) -> bool:
    """True when `source` is produced by a node of an enclosing graph, not of `graph`.

    Bypassing a node whose output is `graph`'s output with such a source is not supported by
    `replace_all_uses` (it would make the outer producer write the body's output).
    """
    producer = producer_of(source)
    return producer is not None and not any(n is producer for n in graph.nodes)


def _can_rename(graph: gs.Graph, source: gs.Tensor) -> bool:
    """True when `source` can simply become the output tensor (call after detaching the no-op).

    It must be written by a node of this graph, be no graph output itself, and have no other
    readers; otherwise keeping the output's name takes an Identity.
    """
    if isinstance(source, gs.Constant) or is_graph_output(graph, source) or source.outputs:
        return False
    producer = producer_of(source)
    return producer is not None and any(n is producer for n in graph.nodes)


def _would_leave_identity(graph: gs.Graph, source: gs.Tensor, node: gs.Node) -> bool:
    """True when bypassing `node` would need an Identity to keep its output's name."""
    if isinstance(source, gs.Constant) or is_graph_output(graph, source):
        return True
    producer = producer_of(source)
    if producer is None or not any(n is producer for n in graph.nodes):
        return True
    return any(reader is not node for reader in source.outputs)


class RemoveIdentity(_BypassRule):
    """Case 1: `Identity(x)` -> `x`, except an Identity that only keeps an output name."""

    name = "remove-identity"
    op_types = ("Identity",)

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        return True

    def keeps_identity(self, match: Bypass, ctx: RuleContext) -> bool:
        return _would_leave_identity(ctx.graph, match.source, match.node)


class RemoveInferenceDropout(_BypassRule):
    """Case 2: `Dropout` in inference mode with an unused mask."""

    name = "remove-inference-dropout"
    op_types = ("Dropout",)

    def is_noop(self, node: gs.Node, ctx: RuleContext) -> bool:
        if ctx.opset < 7:
            return int(node.attrs.get("is_test", 0)) == 1
        if ctx.opset < 12 or len(node.inputs) < 3 or node.inputs[2].is_empty():
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


def reshape_is_noop(dims: list[int | None], target: list[int], allowzero: bool) -> bool:
    """True when Reshape(x, target) returns x's own shape (dims: None where symbolic)."""
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
        if ctx.opset < 10:
            starts = node.attrs.get("starts")
            ends = node.attrs.get("ends")
            axes = node.attrs.get("axes")
            steps = None
        else:
            starts = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
            ends = int_list(node.inputs[2]) if len(node.inputs) > 2 else None
            axes = _optional_ints(node, 3)
            steps = _optional_ints(node, 4)
            if axes is False or steps is False:
                return False
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


def _optional_ints(node: gs.Node, index: int) -> list[int] | None | bool:
    """An optional constant int-list input: None when absent, False when not constant."""
    if len(node.inputs) <= index or node.inputs[index].is_empty():
        return None
    values = int_list(node.inputs[index])
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
