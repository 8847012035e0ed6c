"""Merge chains of layout ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze) into one op.

All cases are exact: they only move elements (or not even that), never compute with them.

1. `Transpose(Transpose(x, p1), p2) = Transpose(x, p)` with `p[k] = p1[p2[k]]`; when `p` is the
   identity the no-op rule then removes the second Transpose.
2. `Reshape(R(x), s2) = Reshape(x, s2)` for R in {Reshape, Flatten, Squeeze, Unsqueeze}: these
   keep the row-major element order, and a -1 in `s2` infers from the element count, which R
   does not change. A 0 in `s2` (with `allowzero=0`) copies a dim of R's *output*, so it is
   replaced by that dim when it is static, and the rule declines otherwise. With
   `allowzero=1` a 0 is a literal 0 and any `s2`, even a computed one, is safe.
3. Squeeze/Unsqueeze pairs are simulated on axis labels (inserted axes are size 1, squeezed
   axes must be size 1): `Squeeze(Unsqueeze(x, a), a) = x`, `Unsqueeze(Squeeze(x, a), a) = x`;
   two Unsqueezes (or two Squeezes) become one with the combined axes (in `x`'s terms); a mix
   that both removes and inserts axes becomes a Reshape (case 4's target).
4. A Flatten/Squeeze/Unsqueeze of a Reshape/Flatten/Squeeze/Unsqueeze becomes one
   `Reshape(x, t)`: `t` takes each output dim that is static, 0 where the output dim is the
   same symbolic dim at the same index of `x` (copy), and -1 for at most one other dim.

Axes are an attribute before opset 13 and an input from opset 13 (Squeeze, Unsqueeze); new
nodes follow the model's opset. Merges need the first op's output to be read only by the
second (otherwise nothing is saved); when the pair cancels out (cases 1 to 3) a shared first op
is fine too, since the second op then goes away entirely.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    detach,
    input_or_attr,
    int_list,
    is_graph_output,
    is_op,
    make_constant,
    only_consumer,
    outer_scope_source,
    producer_of,
    replace_all_uses,
    tensor_dims,
    unique_name,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext
from onnxshrink.engine.patterns import reshape_is_noop

logger = logging.getLogger(__name__)

_RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_AXES_INPUT_SINCE = 13


def _layout_producer(tensor: gs.Tensor, ops: tuple[str, ...]) -> gs.Node | None:
    producer = producer_of(tensor)
    if not is_op(producer, *ops):
        return None
    if not producer.inputs or producer.inputs[0].is_empty():
        return None
    return producer


# ---------------------------------------------------------------------------------------------
# Case 1: Transpose -> Transpose


@dataclass
class _TransposePair:
    first: gs.Node
    second: gs.Node
    perm: list[int]


def _perm_of(node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    dims = tensor_dims(node.inputs[0])
    return None if dims is None else list(reversed(range(len(dims))))


class ComposeTransposes(Rule[_TransposePair, _TransposePair]):
    """Case 1: two Transposes in a row become one with the composed permutation."""

    name = "compose-transposes"
    op_types = ("Transpose",)

    def match(self, node: gs.Node, ctx: RuleContext) -> _TransposePair | None:
        first = _layout_producer(node.inputs[0], ("Transpose",))
        if first is None:
            return None
        p1, p2 = _perm_of(first), _perm_of(node)
        if p1 is None or p2 is None or len(p1) != len(p2):
            return None
        return _TransposePair(first, node, [p1[k] for k in p2])

    def check(self, match: _TransposePair, ctx: RuleContext) -> _TransposePair | Decline:
        identity = match.perm == list(range(len(match.perm)))
        if not identity and not only_consumer(ctx.graph, match.first.outputs[0], match.second):
            return Decline("first Transpose has other readers")
        return match

    def rewrite(self, match: _TransposePair, ctx: RuleContext) -> None:
        match.second.inputs[0] = match.first.inputs[0]
        match.second.attrs["perm"] = match.perm


# ---------------------------------------------------------------------------------------------
# Case 2: Reshape of a reshape-like op


@dataclass
class _ReshapeOfReshape:
    inner: gs.Node
    outer: gs.Node
    shape: list[int] | None  # the outer's constant shape, None when computed


@dataclass
class _CollapsePlan:
    inner: gs.Node
    outer: gs.Node
    new_shape: list[int] | None  # a constant shape to write (0s resolved), None: keep the input


class CollapseReshapes(Rule[_ReshapeOfReshape, _CollapsePlan]):
    """Case 2: `Reshape(R(x), s)` -> `Reshape(x, s)` for R a reshape-like op."""

    name = "collapse-reshapes"
    op_types = ("Reshape",)
    min_opset = 5

    def match(self, node: gs.Node, ctx: RuleContext) -> _ReshapeOfReshape | None:
        if len(node.inputs) < 2:
            return None
        inner = _layout_producer(node.inputs[0], _RESHAPE_LIKE)
        if inner is None:
            return None
        return _ReshapeOfReshape(inner, node, int_list(node.inputs[1]))

    def check(self, match: _ReshapeOfReshape, ctx: RuleContext) -> _CollapsePlan | Decline:
        allowzero = bool(match.outer.attrs.get("allowzero", 0))
        if match.shape is None and not allowzero:
            return Decline("computed shape may copy dims of the inner output")
        target = match.shape
        if match.shape is not None and not allowzero:
            target = _resolve_copies(match.shape, tensor_dims(match.outer.inputs[0]))
            if target is None:
                return Decline("shape copies a dynamic dim of the inner output")
        if not only_consumer(ctx.graph, match.inner.outputs[0], match.outer):
            dims = tensor_dims(match.inner.inputs[0])
            if target is None or dims is None or not reshape_is_noop(dims, target, allowzero):
                return Decline("inner op has other readers")
        # A 0 copied a dim of the inner output, which goes: write the resolved shape instead.
        copies = match.shape is not None and 0 in match.shape and not allowzero
        return _CollapsePlan(match.inner, match.outer, target if copies else None)

    def rewrite(self, plan: _CollapsePlan, ctx: RuleContext) -> None:
        plan.outer.inputs[0] = plan.inner.inputs[0]
        if plan.new_shape is not None:
            name = f"{plan.outer.name or plan.outer.outputs[0].name}_shape"
            shape = np.array(plan.new_shape, np.int64)
            plan.outer.inputs[1] = make_constant(ctx.graph, name, shape)


def _resolve_copies(shape: list[int], middle: list[int | None] | None) -> list[int] | None:
    """Case 2: replace each 0 (copy) entry by the static dim it copies; None if one is dynamic."""
    if 0 not in shape:
        return shape
    if middle is None:
        return None
    resolved = []
    for i, entry in enumerate(shape):
        if entry == 0:
            copied = middle[i] if i < len(middle) else None
            if copied is None or copied == 0:
                return None
            entry = copied
        resolved.append(entry)
    return resolved


# ---------------------------------------------------------------------------------------------
# Cases 3 and 4: Squeeze/Unsqueeze/Flatten chains

_NEW = "new"  # label of an inserted (size-1) axis


@dataclass
class _Chain:
    first: gs.Node
    second: gs.Node
    kind: str  # "identity", "Squeeze", "Unsqueeze" or "Reshape"
    axes: list[int] = field(default_factory=list)
    shape: list[int] = field(default_factory=list)


@dataclass
class _ChainPlan:
    chain: _Chain
    first_dies: bool  # the second op is the first's only reader: both go


def _axes(node: gs.Node, ctx: RuleContext) -> tuple[bool, list[int] | None]:
    return input_or_attr(node, ctx.opset, 1, "axes", input_since=_AXES_INPUT_SINCE)


def _apply_to_labels(
    labels: list, dims: list[int | None], node: gs.Node, ctx: RuleContext
) -> tuple[list, list[int | None]] | None:
    """Case 3: apply a Squeeze/Unsqueeze to axis labels (and dims); None when unknown."""
    present, axes = _axes(node, ctx)
    if present and axes is None:
        return None
    # from here on, axes is None exactly when the operand is absent
    if node.op == "Unsqueeze":
        if axes is None:
            return None
        rank = len(labels) + len(axes)
        norm = sorted(a + rank if a < 0 else a for a in axes)
        if len(set(norm)) != len(norm) or any(not 0 <= a < rank for a in norm):
            return None
        labels, dims = list(labels), list(dims)
        for a in norm:
            labels.insert(a, _NEW)
            dims.insert(a, 1)
        return labels, dims
    rank = len(labels)
    if axes is not None:
        squeezed = {a + rank if a < 0 else a for a in axes}
        if any(not 0 <= a < rank for a in squeezed):
            return None
    else:  # squeeze every size-1 dim: needs them all static
        if any(d is None for d in dims):
            return None
        squeezed = {i for i, d in enumerate(dims) if d == 1}
    keep = [i for i in range(rank) if i not in squeezed]
    return [labels[i] for i in keep], [dims[i] for i in keep]


def _reshape_target(out: gs.Tensor, source: gs.Tensor) -> list[int] | None:
    """Case 4: a Reshape target for `source` that yields `out`'s (inferred) shape."""
    out_shape = out.shape
    src_shape = source.shape
    if out_shape is None:
        return None
    target: list[int] = []
    inferred = False
    for i, dim in enumerate(out_shape):
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            if dim == 0:
                return None  # a literal 0 would mean "copy" without allowzero
            target.append(int(dim))
        elif (
            isinstance(dim, str)
            and dim not in ("", "?")  # "?" is a placeholder, not a name
            and src_shape is not None
            and i < len(src_shape)
            and src_shape[i] == dim
        ):
            target.append(0)
        elif not inferred:
            inferred = True
            target.append(-1)
        else:
            return None
    return target


def _labels_target(labels: list, dims: list[int | None], source: gs.Tensor) -> list[int] | None:
    """Case 3 -> 4: a Reshape target from axis labels (original axes keep their dims)."""
    target: list[int] = []
    inferred = False
    for position, label in enumerate(labels):
        if label == _NEW:
            target.append(1)
            continue
        dim = dims[position]
        if dim is not None and dim > 0:
            target.append(dim)
        elif dim is None and position == label:
            target.append(0)
        elif dim is None and not inferred:
            inferred = True
            target.append(-1)
        else:
            return None
    return target


class MergeSqueezeUnsqueeze(Rule[_Chain, _ChainPlan]):
    """Cases 3 and 4: two reshape-like ops in a row become one op, or none."""

    name = "merge-squeeze-unsqueeze"
    op_types = ("Squeeze", "Unsqueeze", "Flatten")

    def match(self, node: gs.Node, ctx: RuleContext) -> _Chain | None:
        first = _layout_producer(node.inputs[0], _RESHAPE_LIKE)
        if first is None:
            return None
        source = first.inputs[0]
        if first.op in ("Squeeze", "Unsqueeze") and node.op in ("Squeeze", "Unsqueeze"):
            chain = self._match_labels(first, node, source, ctx)
            if chain is not None:
                return chain
        if ctx.opset < 5:
            return None
        target = _reshape_target(node.outputs[0], source)
        if target is None:
            return None
        return _Chain(first, node, "Reshape", shape=target)

    @staticmethod
    def _match_labels(
        first: gs.Node, second: gs.Node, source: gs.Tensor, ctx: RuleContext
    ) -> _Chain | None:
        dims = tensor_dims(source)
        if dims is None:
            return None
        start = list(range(len(dims)))
        state = _apply_to_labels(start, dims, first, ctx)
        if state is not None:
            state = _apply_to_labels(*state, second, ctx)
        if state is None:
            return None
        labels, out_dims = state
        if labels == start:
            return _Chain(first, second, "identity")
        inserted = [p for p, label in enumerate(labels) if label == _NEW]
        removed = [i for i in start if i not in labels]
        if not removed:
            return _Chain(first, second, "Unsqueeze", axes=inserted)
        if not inserted:
            return _Chain(first, second, "Squeeze", axes=removed)
        if ctx.opset < 5:
            return None
        target = _labels_target(labels, out_dims, source)
        return None if target is None else _Chain(first, second, "Reshape", shape=target)

    def check(self, match: _Chain, ctx: RuleContext) -> _ChainPlan | Decline:
        first_dies = only_consumer(ctx.graph, match.first.outputs[0], match.second)
        if match.kind != "identity" and not first_dies:
            return Decline("first op has other readers")
        if (
            match.kind == "identity"
            and is_graph_output(ctx.graph, match.second.outputs[0])
            and outer_scope_source(ctx.graph, match.first.inputs[0])
        ):
            return Decline("body output read from the outer scope")
        return _ChainPlan(match, first_dies)

    def rewrite(self, plan: _ChainPlan, ctx: RuleContext) -> None:
        graph, match = ctx.graph, plan.chain
        source = match.first.inputs[0]
        out = match.second.outputs[0]
        if match.kind == "identity":
            # The first op dies with the second when nothing else reads it; detaching it now
            # lets replace_all_uses hand a graph output name to `source`'s producer.
            if plan.first_dies:
                detach(match.first)
            detach(match.second)
            replace_all_uses(graph, out, source)
            return
        name = unique_name(graph, match.second.name or f"{out.name}_{match.kind.lower()}")
        detach(match.second)
        if match.kind == "Reshape":
            shape = make_constant(graph, f"{name}_shape", np.array(match.shape, np.int64))
            node = gs.Node("Reshape", name=name, inputs=[source, shape], outputs=[out])
        elif ctx.opset >= _AXES_INPUT_SINCE:
            axes = make_constant(graph, f"{name}_axes", np.array(match.axes, np.int64))
            node = gs.Node(match.kind, name=name, inputs=[source, axes], outputs=[out])
        else:
            node = gs.Node(
                match.kind, name=name, attrs={"axes": match.axes}, inputs=[source], outputs=[out]
            )
        graph.nodes.append(node)


# Transposes first: composing them can expose a Reshape pair; Reshape collapsing before the
# Squeeze/Unsqueeze merge because it keeps the outer op (no new node).
RULES: list[Rule] = [
    ComposeTransposes(),
    CollapseReshapes(),
    MergeSqueezeUnsqueeze(),
]
