"""Merge a Slice of a Slice into one Slice.

`Slice(Slice(x, s1, e1, a1, t1), s2, e2, a2, t2)` selects, on each axis, a sub-range of a
range, which is itself a range. Cases, referred to by number in the code:

1. Disjoint axes (YOLOX's Focus layer slices rows, then columns): the merged Slice takes both
   parameter lists, `axes = a1 + a2`.
2. The same axis in both: the composed range is computed on the axis's static length `n` as
   Python's `range(n)[s1:e1:t1][s2:e2:t2]`, which follows ONNX's clamping rules, and written as
   one `start:end:step` (an end before index 0 of a negative step is INT64_MIN). An empty
   result, or an axis whose length is not static, declines.

Only constant starts, ends, axes and steps (opset >= 10, where they are inputs); negative axes
need the rank of `x`. The inner Slice must not be a graph output, and each of its readers must
be a Slice that merges, so that it goes away: merging one reader of a shared inner Slice would
save nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    int_list,
    is_graph_output,
    is_op,
    make_constant,
    optional_input,
    producer_of,
    readers,
    tensor_dims,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext

logger = logging.getLogger(__name__)

_INT64_MIN = -(2**63)

#: axis -> (start, end, step)
_Ranges = dict[int, tuple[int, int, int]]


@dataclass
class SliceOfSlice:
    """The outer Slice, the inner Slice it reads, and their parameters by axis."""

    inner: gs.Node
    outer: gs.Node


@dataclass
class MergePlan:
    """The merged parameters, written onto the outer Slice, which then reads `x`."""

    outer: gs.Node
    source: gs.Tensor
    ranges: _Ranges


def _ranges(node: gs.Node, rank: int | None) -> _Ranges | None:
    """The node's constant parameters by (non-negative) axis; None when not constant."""
    starts = int_list(node.inputs[1]) if len(node.inputs) > 2 else None
    ends = int_list(node.inputs[2]) if len(node.inputs) > 2 else None
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes_input, steps_input = optional_input(node, 3), optional_input(node, 4)
    axes = int_list(axes_input) if axes_input is not None else list(range(len(starts)))
    steps = int_list(steps_input) if steps_input is not None else [1] * len(starts)
    if axes is None or steps is None or len(axes) != len(starts) or len(steps) != len(starts):
        return None
    result: _Ranges = {}
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if axis < 0:
            if rank is None:
                return None
            axis += rank
        if axis in result or step == 0:
            return None
        result[axis] = (start, end, step)
    return result


def _compose(
    first: tuple[int, int, int], second: tuple[int, int, int], n: int
) -> tuple[int, int, int] | None:
    """Case 2: one (start, end, step) for `range(n)[first][second]`, or None when empty."""
    # Python clamps like ONNX Slice does; huge ends (INT64_MAX) are fine for slice objects.
    picked = range(n)[slice(*first)][slice(*second)]
    if len(picked) == 0:
        return None
    step = picked.step if len(picked) > 1 else 1
    start = picked.start
    end = picked[-1] + step
    if end < 0:
        end = _INT64_MIN  # before index 0 of a backwards slice
    return start, end, step


def merge_ranges(inner: _Ranges, outer: _Ranges, dims: list[int | None] | None) -> _Ranges | None:
    """Cases 1 and 2: the parameters of the merged Slice, or None when they cannot be merged."""
    merged = dict(inner)
    for axis, second in outer.items():
        if axis not in merged:
            merged[axis] = second  # case 1
            continue
        if dims is None or axis >= len(dims) or dims[axis] is None:
            return None
        composed = _compose(merged[axis], second, int(dims[axis]))  # type: ignore[arg-type]
        if composed is None:
            return None
        merged[axis] = composed
    return merged


def _rank(tensor: gs.Tensor) -> int | None:
    dims = tensor_dims(tensor)
    return None if dims is None else len(dims)


class MergeSlices(Rule[SliceOfSlice, MergePlan]):
    """`Slice(Slice(x))` -> `Slice(x)` with merged parameters (cases 1 and 2)."""

    name = "merge-slices"
    op_types = ("Slice",)
    min_opset = 10

    def match(self, node: gs.Node, ctx: RuleContext) -> SliceOfSlice | None:
        inner = producer_of(node.inputs[0])
        if not is_op(inner, "Slice") or not inner.inputs or inner.inputs[0].is_empty():
            return None
        return SliceOfSlice(inner, node)

    def check(self, match: SliceOfSlice, ctx: RuleContext) -> MergePlan | Decline:
        middle = match.inner.outputs[0]
        if is_graph_output(ctx.graph, middle):
            return Decline("inner Slice is a graph output")
        source = match.inner.inputs[0]
        rank = _rank(source)
        inner = _ranges(match.inner, rank)
        if inner is None:
            return Decline("inner Slice parameters are not constant")
        plans = {}
        for reader in readers(middle):
            if not is_op(reader, "Slice") or reader.inputs[0] is not middle:
                return Decline("inner Slice has other readers")
            outer = _ranges(reader, rank)
            if outer is None:
                return Decline("outer Slice parameters are not constant")
            merged = merge_ranges(inner, outer, tensor_dims(source))
            if merged is None:
                return Decline("same axis sliced twice without a static length")
            plans[id(reader)] = merged
        return MergePlan(match.outer, source, plans[id(match.outer)])

    def rewrite(self, plan: MergePlan, ctx: RuleContext) -> None:
        axes = sorted(plan.ranges)
        columns = [[plan.ranges[a][k] for a in axes] for k in range(3)]
        base = plan.outer.name or plan.outer.outputs[0].name
        plan.outer.inputs = [
            plan.source,
            make_constant(ctx.graph, f"{base}_starts", np.array(columns[0], np.int64)),
            make_constant(ctx.graph, f"{base}_ends", np.array(columns[1], np.int64)),
            make_constant(ctx.graph, f"{base}_axes", np.array(axes, np.int64)),
            make_constant(ctx.graph, f"{base}_steps", np.array(columns[2], np.int64)),
        ]


RULES: list[Rule] = [MergeSlices()]
