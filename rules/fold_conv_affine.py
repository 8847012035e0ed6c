"""Fold per-channel affine maps by constants (Mul, Add, Sub, Div) into a neighbouring layer's weights.

Every matched op is an affine map `y = x * s + t` of its one variable input `x`:

    Mul(x, c), Mul(c, x): s = c,   t = 0        Sub(x, c): s = 1,   t = -c
    Add(x, c), Add(c, x): s = 1,   t = c        Sub(c, x): s = -1,  t = c
    Div(x, c):            s = 1/c, t = 0        (Div(c, x) is not affine)

1. Output side (`fold-affine-into-producer`): `x` is written by a Conv, ConvTranspose, Gemm or 2-D
   MatMul `P(x) = W (*) x + b`, which is linear in W and b per output channel o, so

       y[o] = P(x)[o] * s[o] + t[o]   ==>   W'[o] = W[o] * s[o],   b'[o] = b[o] * s[o] + t[o].

   The weight layouts of the four producers (MatMul becomes a Gemm when t != 0) are handled by
   `onnxshrink.engine.affine` (its cases 1 and 2), which `fold-batchnorm` shares.
   The producer is updated in place, so a chain Conv->Mul->Add (or ->Mul->Mul, ->Add->Mul) folds
   op after op in a single sweep: each op then sees the same Conv as its producer.

2. Input side (`fold-affine-into-conv`): `y = x * s + t` (one op or a chain of them, each
   intermediate read only by the next) whose readers are all Convs that do not pad. With s, t
   per input channel i:

       Conv(y)[o] = sum_{i,k} W[o,i,k] * (x[i] * s[i] + t[i]) + b[o]
       ==>  W'[o,i,k] = W[o,i,k] * s[i],   b'[o] = b[o] + sum_{i,k} W[o,i,k] * t[i].

   Padding would put zeros into y where the affine would have put t, so the Conv must not pad:
   auto_pad VALID, auto_pad NOTSET with all pads zero, or SAME_UPPER/SAME_LOWER with a 1x1
   kernel (SAME padding of a size-1 window is always zero). Grouped Convs: input channel `grp * Cin/g + i`
   feeds only W[grp * Cout/g : (grp + 1) * Cout/g, i].
   A shift-free chain (t = 0) folds into padding Convs too: padding x * s with zeros is padding
   x with zeros, then scaling.

2b. Padding Conv, chain of two or more ops with t != 0 and s != 0 everywhere: x * s + t =
   (x + t / s) * s, so the scale still folds (W' = W * s) and the whole chain becomes one
   `Add(x, t / s)` in front of the Conv's padding. The rounding error of `x + t/s` is scaled
   back by s, so it stays of the order of the original's; t/s must be finite in the dtype.

3. Which constants qualify: `c` must broadcast along the channel axis (axis 1) only and must not
   change the result's shape: rank(c) <= rank(x), after right-aligning every dim of c is 1
   except axis 1, which is 1 or C. So scalars, [1], [C,1,1], [1,C,1,1] qualify for a 4-D Conv
   output; [C] does not (it runs along the last, spatial, axis); for Gemm/MatMul [N] and [1,N] do.
   For the input side the shape of x must be known to be [*, Cin, ...] of the Conv's rank, since a
   per-channel constant would otherwise broadcast a 1-channel x up to Cin channels.

4. Preconditions shared by both sides: weights, bias and `c` are constants of the same floating
   dtype; `c` is finite (and non-zero for Div); every tensor that disappears is read only inside
   the pattern, is not a graph output, and belongs to the same graph as the anchor (a producer in
   an outer scope of an If/Loop body is left alone). All arithmetic is done in float64 and cast
   back to the weight dtype.

5. Scale folds re-round every weight, so the engine's retries after a parity failure turn
   them off (`onnxshrink.engine.affine`, case 3): with `fold_output_scales=False`
   `fold-affine-into-producer` folds pure shifts (bias adds) only; with `fold_scales=False`
   both rules here decline any fold whose scale is not 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.affine import (
    FLOAT_DTYPES,
    LINEAR_PRODUCERS,
    SCALE_FOLDS_OFF,
    LinearProducer,
    fold_output_affine,
    folded_name,
    linear_producer,
    scale_folds_allowed,
)
from onnxshrink.engine.graph import (
    const_value,
    detach,
    in_graph,
    is_default_domain,
    is_graph_output,
    is_op,
    make_constant,
    make_variable,
    only_consumer,
    optional_input,
    producer_of,
    replace_all_uses,
    set_input,
    unique_name,
)
from onnxshrink.engine.passes import Decline, Rule, RuleContext

logger = logging.getLogger(__name__)

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
_MAX_CHAIN = 8


# ---------------------------------------------------------------------------------------------
# Affine steps and per-channel constants (case 3); both sides use them
# ---------------------------------------------------------------------------------------------


def channel_vector(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`value` as a float64 vector over `channels` when it varies along axis 1 only (case 3).

    Returns None when `value` has a higher rank than `rank`, varies along another axis, or its
    axis-1 size is neither 1 nor `channels`.
    """
    value = np.asarray(value)
    if value.ndim > rank or rank < 2:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()


def _varies_on_channels(value: np.ndarray, rank: int) -> bool:
    shape = (1,) * (rank - value.ndim) + np.shape(value)
    return shape[1] != 1


@dataclass
class AffineStep:
    """One Mul/Add/Sub/Div by a constant `const`, read as `y = x * scale + shift`.

    `form` says how scale and shift follow from `const`: "mul" (c, 0), "add" (1, c),
    "sub" (1, -c), "rsub" (-1, c: c - x), "div" (1/c, 0).
    """

    node: gs.Node
    x: gs.Tensor
    const: np.ndarray
    form: str


def affine_step(node: gs.Node) -> AffineStep | None:
    """Read a Mul/Add/Sub/Div with exactly one constant operand as an affine map of the other."""
    if node.op not in AFFINE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    if not is_default_domain(node):
        return None
    a, b = node.inputs
    va, vb = const_value(a), const_value(b)
    if (va is None) == (vb is None):
        return None
    x, c, const_first = (b, va, True) if va is not None else (a, vb, False)
    if node.op == "Div" and const_first:  # c / x is not affine in x
        return None
    form = {"Mul": "mul", "Add": "add", "Sub": "rsub" if const_first else "sub", "Div": "div"}[
        node.op
    ]
    return AffineStep(node, x, np.asarray(c), form)


def step_vectors(step: AffineStep, rank: int, channels: int) -> tuple[np.ndarray, np.ndarray] | str:
    """Per-channel (scale, shift) float64 vectors of a step, or the reason it does not qualify."""
    c = step.const
    if c.dtype not in FLOAT_DTYPES:
        return f"{step.node.op} constant is not floating point ({c.dtype})"
    if not np.all(np.isfinite(c)):
        return f"{step.node.op} constant has non-finite values"
    vec = channel_vector(c, rank, channels)
    if vec is None:
        return (
            f"{step.node.op} constant of shape {list(c.shape)} is not per-channel "
            f"for a rank-{rank} tensor with {channels} channels"
        )
    ones, zeros = np.ones(channels), np.zeros(channels)
    if step.form == "mul":
        return vec, zeros
    if step.form == "add":
        return ones, vec
    if step.form == "sub":
        return ones, -vec
    if step.form == "rsub":
        return -ones, vec
    if np.any(vec == 0):
        return "Div by a constant with zeros"
    return 1.0 / vec, zeros


def _float_equal_dtype(a: np.ndarray, b: np.ndarray) -> bool:
    return np.asarray(a).dtype == np.asarray(b).dtype


# ---------------------------------------------------------------------------------------------
# Case 1: affine after a Conv/ConvTranspose/Gemm/MatMul
# ---------------------------------------------------------------------------------------------


@dataclass
class _OutputMatch:
    step: AffineStep
    producer: gs.Node


@dataclass
class _OutputPlan:
    step: AffineStep
    producer: LinearProducer  # its weights and bias, read once by check
    scale: np.ndarray  # float64, per output channel
    shift: np.ndarray


class FoldAffineIntoProducer(Rule[_OutputMatch, _OutputPlan]):
    """Conv/ConvTranspose/Gemm/2-D MatMul followed by Mul/Add/Sub/Div by a per-channel constant (case 1)."""

    name = "fold-affine-into-producer"
    op_types = AFFINE_OPS

    def match(self, node: gs.Node, ctx: RuleContext) -> _OutputMatch | None:
        step = affine_step(node)
        if step is None:
            return None
        producer = producer_of(step.x)
        if not is_op(producer, *LINEAR_PRODUCERS):
            return None
        return _OutputMatch(step, producer)

    def check(self, m: _OutputMatch, ctx: RuleContext) -> _OutputPlan | Decline:
        if not only_consumer(ctx.graph, m.step.x, m.step.node):
            return Decline(f"{m.producer.op} output has other readers or is a graph output")
        if not in_graph(ctx.graph, m.producer):
            return Decline(f"{m.producer.op} is in another graph scope")
        lp = linear_producer(m.producer, ctx.opset)
        if isinstance(lp, str):
            return Decline(lp)
        if np.asarray(m.step.const).dtype != lp.dtype:
            return Decline(f"{m.step.node.op} constant dtype differs from the weight dtype")
        vectors = step_vectors(m.step, lp.rank, lp.channels)
        if isinstance(vectors, str):
            return Decline(vectors)
        if np.any(vectors[0] != 1) and not scale_folds_allowed(ctx, output_side=True):
            return Decline(SCALE_FOLDS_OFF)
        return _OutputPlan(m.step, lp, vectors[0], vectors[1])

    def rewrite(self, plan: _OutputPlan, ctx: RuleContext) -> None:
        fold_output_affine(ctx.graph, plan.producer, plan.scale, plan.shift)
        out = plan.step.node.outputs[0]
        detach(plan.step.node)
        replace_all_uses(ctx.graph, out, plan.step.x)


# ---------------------------------------------------------------------------------------------
# Case 2: affine before Convs that do not pad
# ---------------------------------------------------------------------------------------------


@dataclass
class _InputMatch:
    steps: list[AffineStep]  # nearest to the Convs first
    convs: list[gs.Node]


@dataclass
class _ReadingConv:
    """A Conv that reads the affine's output, with its constant weight and bias as check read them."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    bias_tensor: gs.Tensor | None


@dataclass
class _InputPlan:
    steps: list[AffineStep]  # the ops that go (a prefix of the match's, nearest first)
    convs: list[_ReadingConv]
    scale: np.ndarray  # per input channel, into W
    shift: np.ndarray  # per input channel, into b
    residual_shift: np.ndarray | None  # case 2b: t / s, kept as an Add before the Convs


def _conv_pads_nothing(conv: gs.Node, weight: np.ndarray) -> bool:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad == "VALID":
        return True
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in weight.shape[2:])  # SAME pads a 1x1 window by zero
    return auto_pad == "NOTSET" and not any(conv.attrs.get("pads", []))


class FoldAffineIntoConv(Rule[_InputMatch, _InputPlan]):
    """Mul/Add/Sub/Div by per-channel constants whose readers are all non-padding Convs (case 2)."""

    name = "fold-affine-into-conv"
    op_types = AFFINE_OPS

    def match(self, node: gs.Node, ctx: RuleContext) -> _InputMatch | None:
        y = node.outputs[0] if len(node.outputs) == 1 else None
        if y is None or not y.outputs:
            return None
        for reader in y.outputs:
            if not is_op(reader, "Conv") or reader.inputs[0] is not y:
                return None
        step = affine_step(node)
        if step is None:
            return None
        steps = [step]
        # Walk up the chain while each op's only reader is the next op.
        while len(steps) < _MAX_CHAIN:
            prev = producer_of(steps[-1].x)
            if prev is None or prev.op not in AFFINE_OPS:
                break
            prev_step = affine_step(prev)
            if prev_step is None or not only_consumer(ctx.graph, prev.outputs[0], steps[-1].node):
                break
            if not in_graph(ctx.graph, prev):
                break
            steps.append(prev_step)
        return _InputMatch(steps, list(y.outputs))

    def check(self, m: _InputMatch, ctx: RuleContext) -> _InputPlan | Decline:
        y = m.steps[0].node.outputs[0]
        if is_graph_output(ctx.graph, y):
            return Decline("affine output is a graph output")
        convs: list[_ReadingConv] = []
        pads = False
        for conv in m.convs:
            if not in_graph(ctx.graph, conv):
                return Decline("a reading Conv is in another graph scope")
            if any(t is y for t in conv.inputs[1:]):
                return Decline("affine output is also a Conv weight or bias")
            w = const_value(conv.inputs[1])
            if w is None:
                return Decline("Conv weight is not a constant")
            w = np.asarray(w)
            if w.dtype not in FLOAT_DTYPES or w.ndim < 3:
                return Decline("Conv weight is not a floating-point tensor of rank >= 3")
            bias_tensor = optional_input(conv, 2)
            bias = None
            if bias_tensor is not None:
                bias = const_value(bias_tensor)
                if bias is None:
                    return Decline("Conv bias is not a constant")
                bias = np.asarray(bias)
            pads |= not _conv_pads_nothing(conv, w)
            convs.append(_ReadingConv(conv, w, bias, bias_tensor))
        first = convs[0].weight
        rank = first.ndim
        channels = first.shape[1] * int(m.convs[0].attrs.get("group", 1))
        for reading in convs:
            w, group = reading.weight, int(reading.node.attrs.get("group", 1))
            if w.ndim != rank or w.shape[1] * group != channels:
                return Decline("reading Convs disagree on input channels")
            if w.shape[0] % group:
                return Decline("Conv output channels not divisible by group")
        # Take the longest chain (from the Convs upwards) whose constants qualify.
        usable: list[tuple[AffineStep, np.ndarray, np.ndarray]] = []
        reason = None
        for step in m.steps:
            reason = self._step_reason(step, first, rank, channels)
            vectors = step_vectors(step, rank, channels) if reason is None else reason
            if isinstance(vectors, str):
                reason = vectors
                break
            usable.append((step, vectors[0], vectors[1]))
        if not usable:
            return Decline(reason or "no foldable affine")
        scale, shift = np.ones(channels), np.zeros(channels)
        for _, s, t in reversed(usable):  # farthest op first: (x*s1+t1)*s2+t2
            scale, shift = scale * s, shift * s + t
        steps = [u[0] for u in usable]
        if np.any(scale != 1) and not scale_folds_allowed(ctx):
            return Decline(SCALE_FOLDS_OFF)
        if not pads or not np.any(shift):
            return _InputPlan(steps, convs, scale, shift, None)
        # Case 2b: keep the shift in front of the padding as one Add of t/s.
        if len(steps) < 2 or not np.any(scale != 1):
            return Decline("Conv pads its input (padding zeros are not mapped by the shift)")
        if np.any(scale == 0):
            return Decline("Conv pads its input and the affine scale has zeros")
        residual = (shift / scale).astype(first.dtype)
        if not np.all(np.isfinite(residual)):
            return Decline("Conv pads its input and shift / scale overflows")
        return _InputPlan(steps, convs, scale, np.zeros(channels), residual)

    @staticmethod
    def _step_reason(step: AffineStep, weight: np.ndarray, rank: int, channels: int) -> str | None:
        if not _float_equal_dtype(step.const, weight):
            return f"{step.node.op} constant dtype differs from the Conv weight dtype"
        shape = step.x.shape
        if shape is None or len(shape) != rank:
            return "affine input rank unknown or not the Conv's"
        if (
            step.const.ndim <= rank
            and _varies_on_channels(step.const, rank)
            and shape[1] != channels
        ):
            return "affine input channel count unknown or broadcast by the constant"
        return None

    def rewrite(self, plan: _InputPlan, ctx: RuleContext) -> None:
        source = plan.steps[-1].x
        if plan.residual_shift is not None:
            anchor = plan.steps[0].node
            rank = len(source.shape)
            shift = make_constant(
                ctx.graph,
                folded_name(f"{anchor.name or 'affine'}_shift"),
                plan.residual_shift.reshape((1, -1) + (1,) * (rank - 2)),
            )
            shifted = make_variable(ctx.graph, f"{source.name}_shifted", like=anchor.outputs[0])
            name = unique_name(ctx.graph, f"{anchor.name or 'affine'}_shift")
            ctx.graph.nodes.append(
                gs.Node("Add", name=name, inputs=[source, shift], outputs=[shifted])
            )
            source = shifted
        for conv in plan.convs:
            self._fold_into_conv(ctx.graph, conv, plan.scale, plan.shift)
            conv.node.inputs[0] = source
        for step in plan.steps:
            detach(step.node)

    @staticmethod
    def _fold_into_conv(
        graph: gs.Graph, reading: _ReadingConv, scale: np.ndarray, shift: np.ndarray
    ) -> None:
        conv, w = reading.node, reading.weight
        dtype = w.dtype
        group = int(conv.attrs.get("group", 1))
        cout, cin_g = w.shape[0], w.shape[1]

        def per_row(v: np.ndarray) -> np.ndarray:
            # Input-channel vector as seen by each output row: [Cout, Cin/g].
            return np.repeat(v.reshape(group, cin_g), cout // group, axis=0)

        w64 = w.astype(np.float64)
        new_w = w64 * per_row(scale).reshape((cout, cin_g) + (1,) * (w.ndim - 2))
        bias_tensor = reading.bias_tensor
        bias_hint = bias_tensor.name if bias_tensor is not None else f"{conv.inputs[1].name}_bias"
        bias = np.zeros(cout) if reading.bias is None else reading.bias.astype(np.float64)
        new_b = bias + (w64.reshape(cout, cin_g, -1).sum(axis=2) * per_row(shift)).sum(axis=1)
        conv.inputs[1] = make_constant(graph, folded_name(conv.inputs[1].name), new_w.astype(dtype))
        if bias_tensor is None and not np.any(new_b):
            return
        set_input(conv, 2, make_constant(graph, folded_name(bias_hint), new_b.astype(dtype)))


# Output side first: when an affine sits between two Convs, folding backwards is always legal,
# while folding forwards needs the second Conv not to pad.
RULES: list[Rule] = [FoldAffineIntoProducer(), FoldAffineIntoConv()]
