"""Folding a per-channel affine map into the weights of the layer that writes its input.

`fold-affine-into-producer` (a Mul/Add/Sub/Div by a constant after the layer, in
rules/fold_conv_affine.py) and `fold-batchnorm` (rules/fold_batchnorm.py) both rewrite
`y = P(x) * s + t`, with s and t vectors over P's output channels, into P's weights; this
module is the algebra they share. Cases (the code's comments refer to them):

1. Linear producers (`LINEAR_PRODUCERS`, `linear_producer`): a Conv, ConvTranspose, Gemm or
   2-D MatMul `P(x) = W (*) x + b` with constant floating-point weights is linear in W and b
   per output channel o, so

       y[o] = P(x)[o] * s[o] + t[o]   ==>   W'[o] = W[o] * s[o],   b'[o] = b[o] * s[o] + t[o].

   A MatMul qualifies when its input A is known to be 2-D: output channel axis 1 is then the
   weight's output axis (and opset >= 7, for the Gemm with a broadcast bias it may become).
2. Weight layouts (`fold_output_affine`): Conv W is [Cout, Cin/g, k...]; ConvTranspose W is
   [Cin, Cout/g, k...] and output channel o = grp * Cout/g + j sits at
   W[grp * Cin/g : (grp + 1) * Cin/g, j]; Gemm `alpha * A' @ B' + beta * C` scales the columns
   of B' and takes `C' = beta * C * s + t, beta' = 1`; MatMul becomes that Gemm when t != 0.
   The producer is updated in place (a bias is added where needed). Arithmetic is done in
   float64 and cast back to the weight dtype (one of `FLOAT_DTYPES`); rewritten constants are
   named `<name>_folded` (`folded_name`).
3. Scale folds re-round every weight. After a parity failure caused by accumulated float32
   rounding the engine retries with fewer of them (`scale_folds_allowed`): option
   `fold_output_scales=False` makes `fold-affine-into-producer` fold pure shifts (bias adds)
   only; `fold_scales=False` makes every affine fold and `fold-batchnorm` decline any fold
   whose scale is not 1 (with `SCALE_FOLDS_OFF` as the reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    const_spec,
    const_value,
    is_default_domain,
    make_constant,
    optional_input,
    set_input,
)
from onnxshrink.engine.passes import RuleContext

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# RuleContext options set by the engine's conservative retries (case 3).
FOLD_SCALES_OPTION = "fold_scales"  # False: no fold may rescale weights
FOLD_OUTPUT_SCALES_OPTION = (
    "fold_output_scales"  # False: fold-affine-into-producer folds shifts only
)
SCALE_FOLDS_OFF = "weight rescaling is off (fp32 rounding moved the outputs past tolerance)"

# Ops whose output is linear in (weight, bias) per output channel: see case 1.
LINEAR_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def scale_folds_allowed(ctx: RuleContext, output_side: bool = False) -> bool:
    """False when the engine asked for fewer weight rescalings (case 3).

    Folding a scale into weights is exact in real arithmetic but re-rounds every weight; on a
    numerically sensitive model the accumulated float32 rounding can exceed the parity bar,
    and the engine then retries with fewer scale folds.
    """
    if not ctx.options.get(FOLD_SCALES_OPTION, True):
        return False
    return not output_side or bool(ctx.options.get(FOLD_OUTPUT_SCALES_OPTION, True))


def folded_name(name: str) -> str:
    """A name hint for a rewritten constant: `<name>_folded`, without piling up suffixes."""
    return re.sub(r"(_folded(_\d+)?)+$", "", name or "w") + "_folded"


@dataclass
class LinearProducer:
    """A Conv/ConvTranspose/Gemm/2-D MatMul whose weights are constants: what case 1 needs.

    The weight's values are read only when a rewrite needs them (`weight`): deciding needs
    its dtype and shape, and a bare shift folds without touching it, so a large model's
    weights are not all loaded into arrays just to be checked.
    """

    node: gs.Node
    weight_tensor: gs.Tensor
    dtype: np.dtype
    bias: np.ndarray | None
    channels: int  # output channels (axis 1 of the output)
    rank: int  # output rank

    @property
    def weight(self) -> np.ndarray:
        value = const_value(self.weight_tensor)
        assert value is not None  # checked by linear_producer
        return np.asarray(value)


def linear_producer(node: gs.Node, opset: int) -> LinearProducer | str:
    """Describe `node` for output-side folding, or return why its weights cannot absorb a scale."""
    if not is_default_domain(node) or node.op not in LINEAR_PRODUCERS:
        return f"input comes from {node.op}, not {'/'.join(LINEAR_PRODUCERS)}"
    if len(node.outputs) != 1:
        return f"{node.op} has several outputs"
    w_tensor = node.inputs[1] if len(node.inputs) > 1 else None
    w = const_spec(w_tensor)
    if w is None:
        return f"{node.op} weight is not a constant"
    if w.dtype not in FLOAT_DTYPES:
        return f"{node.op} weight is not floating point ({w.dtype})"
    bias_tensor = optional_input(node, 2)
    bias = None
    if bias_tensor is not None:
        bias = const_value(bias_tensor)
        if bias is None:
            return f"{node.op} bias is not a constant"
        bias = np.asarray(bias)
    if node.op in ("Conv", "ConvTranspose"):
        group = int(node.attrs.get("group", 1))
        if w.ndim < 3 or group < 1:
            return f"{node.op} weight has rank {w.ndim}"
        if node.op == "Conv":
            channels = w.shape[0]
        else:
            if w.shape[0] % group:
                return "ConvTranspose input channels not divisible by group"
            channels = w.shape[1] * group
        if channels % group:
            return f"{node.op} output channels not divisible by group"
        if bias is not None and bias.shape != (channels,):
            return f"{node.op} bias shape {list(bias.shape)} is not [{channels}]"
        return LinearProducer(node, w_tensor, w.dtype, bias, channels, w.ndim)
    if w.ndim != 2:
        return f"{node.op} weight is not 2-D"
    if node.op == "MatMul":
        a_shape = node.inputs[0].shape
        if a_shape is None or len(a_shape) != 2:
            return "MatMul input A is not known to be 2-D"
        if opset < 7:
            return "Gemm with broadcast bias needs opset 7"
        return LinearProducer(node, w_tensor, w.dtype, None, w.shape[1], 2)
    channels = w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
    if bias is not None and bias.ndim > 2:
        return f"Gemm C has rank {bias.ndim}"
    return LinearProducer(node, w_tensor, w.dtype, bias, channels, 2)


def fold_output_affine(
    graph: gs.Graph, lp: LinearProducer, scale: np.ndarray, shift: np.ndarray
) -> None:
    """Make `lp.node` compute `node(x) * scale + shift` (per output channel) in place (cases 1, 2)."""
    bias_hint = folded_name(_bias_hint(lp.node))  # before the weight gets its new name
    if not np.all(scale == 1):  # a bare shift (a bias Add) leaves the weight as it is
        _scale_weight(graph, lp, scale)
    _fold_shift(graph, lp, scale, shift, bias_hint)


def _scale_weight(graph: gs.Graph, lp: LinearProducer, scale: np.ndarray) -> None:
    node = lp.node
    dtype = lp.dtype
    w = lp.weight.astype(np.float64)
    c = lp.channels
    if node.op == "Conv":
        w = w * scale.reshape((c,) + (1,) * (w.ndim - 1))
    elif node.op == "ConvTranspose":
        group = int(node.attrs.get("group", 1))
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        s = scale.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        w = (grouped * s).reshape(w.shape)
    elif node.op == "MatMul" or not node.attrs.get("transB", 0):
        w = w * scale[None, :]
    else:
        w = w * scale[:, None]
    node.inputs[1] = make_constant(graph, folded_name(node.inputs[1].name), w.astype(dtype))


def _fold_shift(
    graph: gs.Graph, lp: LinearProducer, scale: np.ndarray, shift: np.ndarray, bias_hint: str
) -> None:
    node = lp.node
    dtype = lp.dtype
    c = lp.channels
    if node.op in ("Conv", "ConvTranspose"):
        bias = np.zeros(c) if lp.bias is None else lp.bias.astype(np.float64)
        set_input(
            node,
            2,
            make_constant(graph, bias_hint, (bias * scale + shift).astype(dtype)),
        )
        return
    if node.op == "MatMul":
        if not np.any(shift):
            return
        node.op = "Gemm"
        node.attrs.clear()
        node.inputs.append(make_constant(graph, bias_hint, shift.astype(dtype)))
        return
    beta = float(node.attrs.get("beta", 1.0))
    if lp.bias is None:
        if not np.any(shift):
            return
        new_c = shift
    else:
        new_c = beta * lp.bias.astype(np.float64) * scale + shift
    node.attrs["beta"] = 1.0
    set_input(node, 2, make_constant(graph, bias_hint, new_c.astype(dtype)))


def _bias_hint(node: gs.Node) -> str:
    bias = optional_input(node, 2)
    if bias is not None:
        return bias.name
    return f"{node.inputs[1].name}_bias"
