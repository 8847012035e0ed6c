"""Merge a zero Pad into the Conv that reads it: Pad(x, pads) -> Conv  ==>  Conv(x, pads' = pads + conv pads).

Conv pads its input with zeros, so a constant-mode Pad with value 0 on the spatial axes only is
the same as a larger Conv padding. Pads are laid out `[x1_begin, x2_begin, ..., x1_end, ...]` in
both ops; Pad covers every axis (N, C, spatial...), Conv only the spatial ones:

    conv_pads'[i]         = conv_pads[i]         + pad_pads[2 + i]            (begin)
    conv_pads'[S + i]     = conv_pads[S + i]     + pad_pads[R + 2 + i]        (end)

for S = R - 2 spatial axes of a rank-R input.

1. Opset-aware reading of Pad: opset < 11 holds `pads` (`paddings` in opset 1) and `value` as
   attributes; from opset 11 `pads` and `constant_value` are inputs, which must be constants;
   from opset 18 an optional `axes` input (constant) says which axes `pads` covers.
2. Preconditions: mode "constant"; constant value absent or 0; pads non-negative and zero on
   axes 0 and 1; the Pad output read only by the Conv (as its input X), not a graph output, and
   in the same graph; Conv auto_pad NOTSET (or VALID, which is zero padding and becomes NOTSET).
   The input rank comes from the Conv weight (constant or inferred shape) or the Pad's pads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    const_value,
    detach,
    in_graph,
    is_op,
    known_shape,
    only_consumer,
    optional_input,
    producer_of,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext

logger = logging.getLogger(__name__)


@dataclass
class _PadConvMatch:
    pad: gs.Node
    conv: gs.Node


@dataclass
class _PadConvPlan:
    pad: gs.Node
    conv: gs.Node
    pads: list[int]  # the Conv's new pads, [x1_begin, ..., x1_end, ...]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pad_amounts(pad: gs.Node, opset: int, rank: int | None) -> list[int] | str:
    """The Pad's pads over all axes `[b0, b1, ..., e0, e1, ...]` if it is a zero constant pad (case 1)."""
    if _text(pad.attrs.get("mode", "constant")) != "constant":
        return f"Pad mode is {_text(pad.attrs.get('mode'))}"
    if opset < 11:
        pads = pad.attrs.get("pads", pad.attrs.get("paddings"))
        if pads is None:
            return "Pad has no pads attribute"
        if float(pad.attrs.get("value", 0.0)) != 0.0:
            return "Pad value is not 0"
        return [int(p) for p in pads]
    if len(pad.inputs) < 2 or const_value(pad.inputs[1]) is None:
        return "Pad pads are not a constant"
    pads = [int(p) for p in np.asarray(const_value(pad.inputs[1])).reshape(-1)]
    value_tensor = optional_input(pad, 2)
    if value_tensor is not None:
        value = const_value(value_tensor)
        if value is None:
            return "Pad constant_value is not a constant"
        if np.asarray(value).size != 1 or np.asarray(value).reshape(-1)[0] != 0:
            return "Pad constant_value is not 0"
    axes_tensor = optional_input(pad, 3)
    if axes_tensor is None:
        return pads
    axes_value = const_value(axes_tensor)
    if axes_value is None:
        return "Pad axes are not a constant"
    if rank is None:
        return "input rank unknown for Pad axes"
    axes = [int(a) + rank if int(a) < 0 else int(a) for a in np.asarray(axes_value).reshape(-1)]
    if (
        len(pads) != 2 * len(axes)
        or any(not 0 <= a < rank for a in axes)
        or len(set(axes)) != len(axes)
    ):
        return "Pad axes do not match its pads"
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis] = pads[i]
        full[rank + axis] = pads[len(axes) + i]
    return full


def _conv_rank(conv: gs.Node) -> int | None:
    shape = known_shape(conv.inputs[1]) if len(conv.inputs) > 1 else None
    return len(shape) if shape is not None else None


class PadIntoConv(Rule[_PadConvMatch, _PadConvPlan]):
    """Zero constant Pad on spatial axes followed by a Conv becomes the Conv's own padding."""

    name = "pad-into-conv"
    op_types = ("Conv",)

    def match(self, node: gs.Node, ctx: RuleContext) -> _PadConvMatch | None:
        if not node.inputs:
            return None
        pad = producer_of(node.inputs[0])
        if not is_op(pad, "Pad"):
            return None
        return _PadConvMatch(pad, node)

    def check(self, m: _PadConvMatch, ctx: RuleContext) -> _PadConvPlan | Decline:
        pad, conv = m.pad, m.conv
        x = conv.inputs[0]
        if not only_consumer(ctx.graph, x, conv) or any(t is x for t in conv.inputs[1:]):
            return Decline("Pad output has other readers or is a graph output")
        if not in_graph(ctx.graph, pad):
            return Decline("Pad is in another graph scope")
        auto_pad = _text(conv.attrs.get("auto_pad", "NOTSET"))
        if auto_pad not in ("NOTSET", "VALID"):
            return Decline(f"Conv auto_pad is {auto_pad}")
        rank = _conv_rank(conv)
        pads = pad_amounts(pad, ctx.opset, rank)
        if isinstance(pads, str):
            return Decline(pads)
        if len(pads) % 2:
            return Decline("Pad pads have odd length")
        rank = rank if rank is not None else len(pads) // 2
        if len(pads) != 2 * rank or rank < 3:
            return Decline(f"Pad pads do not match the Conv input rank {rank}")
        if any(p < 0 for p in pads):
            return Decline("Pad crops (negative pads)")
        if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            return Decline("Pad pads the batch or channel axis")
        spatial = rank - 2
        conv_pads = (
            [0] * (2 * spatial)
            if auto_pad == "VALID"
            else list(conv.attrs.get("pads", [0] * (2 * spatial)))
        )
        if len(conv_pads) != 2 * spatial:
            return Decline("Conv pads do not match its rank")
        begins = [int(conv_pads[i]) + pads[2 + i] for i in range(spatial)]
        ends = [int(conv_pads[spatial + i]) + pads[rank + 2 + i] for i in range(spatial)]
        return _PadConvPlan(pad, conv, begins + ends)

    def rewrite(self, plan: _PadConvPlan, ctx: RuleContext) -> None:
        plan.conv.attrs["pads"] = plan.pads
        plan.conv.attrs.pop("auto_pad", None)
        plan.conv.inputs[0] = plan.pad.inputs[0]
        detach(plan.pad)


RULES: list[Rule] = [PadIntoConv()]
