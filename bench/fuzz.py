"""Fuzz `onnxshrink optimize` with mutated models: it must never crash, hang or write junk.

Usage:

    .venv/bin/python bench/fuzz.py --count 1000 --seed 0 --jobs 1
    .venv/bin/python bench/fuzz.py --case 0:417 --keep out/fuzz   # one mutant again, files kept

Mutant K of seed S is drawn from its own random generator, `default_rng([S, K])`, so every
case reproduces alone (`--case S:K`). Its base model is one of the small models built below
(a conv net with BatchNorm and a decomposed HardSwish, a transformer-style block, an If, a
finite Loop, a shape-arithmetic chain), or a zoo model: the small ones (`ppocr-v4-cls`,
`ppocr-v5-cls`, `silero-vad`) often, the large ones rarely (`BASES`). One to three mutations
are applied to it, then sometimes a byte-level corruption of the serialized file:

1. `drop-node`: remove a node (main graph or a subgraph), or bypass it (its readers read its
   first input).
2. `duplicate-node`: copy a node, with the same outputs (a second writer) or fresh ones.
3. `rewire-input`: point a node input at another tensor of its graph, a missing name, or "".
4. `rewire-output`: make a graph output another tensor.
5. `attribute-value`: change an attribute's value (extreme ints, NaN/inf, longer or shorter
   lists, other strings).
6. `attribute-type`: change an attribute's declared type (with or without the matching field),
   or add an attribute the node does not take.
7. `initializer-dims`: give an initializer (or a Constant node's tensor) other dims (the same
   element count or not).
8. `initializer-dtype`: give an initializer (or a Constant node's tensor) another type (its
   data converted, or left as it was, or an unknown type).
9. `input-type`: change a graph input's element type or dims.
10. `op-type`: change a node's op type (to a standard op or an unknown one).
11. `opset`: change the default-domain opset or the IR version.
12. `corrupt-bytes`: flip, zero, cut or repeat bytes of the serialized file.

Every mutant runs through the whole command line, `onnxshrink optimize MUTANT -o OUT
--time-limit T`, in a child process forked from this one after the heavy imports (so a run
costs no interpreter start-up), pinned to `--jobs` CPUs, with an address-space limit and a wall
timeout. Outcomes:

- `refused` (exit 2) and `failed` (exit 1): one `error:` line on stderr; `internal-error`: exit
  1 whose line says "internal error" (a bug: bad input should be exit 2, anything else a clear
  failure); `time-limit`: exit 1 because a parity run went past `--time-limit` (a Loop whose
  trip count became huge, say: the limit at work); `rewrite-rejected`: exit 1 because the rewritten model is invalid, cannot be
  loaded or run where the mutant can, or moved its outputs (nothing is written, but a rule
  broke the model);
- `optimized` (exit 0): ONNX Runtime is then asked to load the mutant and the output (in another
  child); `unloadable-output` when it loads the mutant but not the output;
- `crash`: a traceback on stderr, an exit code other than 0/1/2, a signal, or more than one
  `error:` line; `hang`: killed at the wall timeout; `input-modified` / `temp-left`: the input
  file changed, or a temporary file stayed behind.

The bad ones are listed with their case ids; exit status 1 when there is any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx.parser  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ZOO = REPO / "models" / "zoo"
#: base models and their weights in the draw: built ones and small zoo models mostly, the
#: large zoo models (seconds per run) about once in a hundred mutants together
BASES: dict[str, float] = {
    "built:conv-bn": 10,
    "built:conv-hardswish": 10,
    "built:transformer-block": 10,
    "built:if": 8,
    "built:loop": 8,
    "built:shape-chain": 8,
    "zoo:ppocr-v4-cls": 15,
    "zoo:ppocr-v5-cls": 15,
    "zoo:silero-vad": 15,
    "zoo:ppocr-v4-det": 0.2,
    "zoo:ppocr-v4-rec": 0.2,
    "zoo:ppocr-v5-det": 0.2,
    "zoo:ppocr-v5-rec": 0.2,
    "zoo:minilm-l6": 0.2,
}
MUTATIONS = (
    "drop-node",
    "duplicate-node",
    "rewire-input",
    "rewire-output",
    "attribute-value",
    "attribute-type",
    "initializer-dims",
    "initializer-dtype",
    "input-type",
    "op-type",
    "opset",
)
BAD = (
    "internal-error",
    "rewrite-rejected",
    "crash",
    "hang",
    "unloadable-output",
    "input-modified",
    "temp-left",
)
# exit-1 lines that blame the rewrite, not the input: the safety net caught a rule's bug
_REWRITE_FAILURES = (
    "the optimized model cannot be loaded by ONNX Runtime",
    "differs from the original beyond",
    "model fails where the original runs",
    "the rewritten model is invalid",
)

OP_TYPES = (
    "Relu", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Conv", "ConvTranspose", "MatMul",
    "Gemm", "Reshape", "Transpose", "Identity", "Concat", "Slice", "Gather", "Cast", "Shape",
    "Softmax", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization",
    "LayerNormalization", "Split", "Squeeze", "Unsqueeze", "Loop", "If", "Scan", "Resize", "Pad",
    "Expand", "Tile", "ConstantOfShape", "Range", "Where", "Sum", "Max", "Min", "ReduceMean",
    "ReduceSum", "Flatten", "GlobalAveragePool", "AveragePool", "MaxPool", "QuantizeLinear",
    "DequantizeLinear", "Einsum", "TopK", "NonZero", "Unique", "CumSum", "Dropout", "Constant",
    "Gelu", "Size", "Not", "Equal", "NotAnOp",
)  # fmt: skip
ATTRIBUTE_NAMES = ("axis", "axes", "perm", "to", "value", "alpha", "mode", "pads", "group", "body")


# ---------------------------------------------------------------------------------------------
# Base models


def _model(text: str, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, value in initializers.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv_bn(rng: np.random.Generator) -> onnx.ModelProto:
    return _model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,16,16] x) => (float[1,10] y) {
    c = Conv <pads = [1,1,1,1]> (x, w, b)
    n = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
    i = Identity (n)
    r = Relu (i)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, fc, fcb)
}""",
        {
            "w": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "b": rng.normal(size=8).astype(np.float32),
            "gamma": rng.uniform(0.5, 1.5, 8).astype(np.float32),
            "beta": rng.normal(size=8).astype(np.float32),
            "mean": rng.normal(size=8).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, 8).astype(np.float32),
            "fc": rng.normal(size=(10, 8)).astype(np.float32),
            "fcb": rng.normal(size=10).astype(np.float32),
        },
    )


def _conv_hardswish(rng: np.random.Generator) -> onnx.ModelProto:
    return _model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
    c = Conv <pads = [1,1,1,1], group = 4> (x, w)
    m = Mul (c, scale)
    a = Add (m, shift)
    three = Constant <value = float {3.0}> ()
    t = Add (a, three)
    lo = Constant <value = float {0.0}> ()
    hi = Constant <value = float {6.0}> ()
    k = Clip (t, lo, hi)
    six = Constant <value = float {6.0}> ()
    d = Div (k, six)
    h = Mul (a, d)
    p = Pad (h, pads)
    c2 = Conv (p, w2)
    y = Add (c2, x)
}""",
        {
            "w": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
            "scale": rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32),
            "shift": rng.normal(size=(1, 4, 1, 1)).astype(np.float32),
            "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
            "w2": rng.normal(size=(4, 4, 3, 3)).astype(np.float32),
        },
    )


def _transformer_block(rng: np.random.Generator) -> onnx.ModelProto:
    return _model(
        """<ir_version: 8, opset_import: ["" : 14]>
g (float[1,8,16] x) => (float[1,8,16] y) {
    q = MatMul (x, wq)
    qb = Add (q, bq)
    s = Shape (qb)
    hd = Constant <value = int64[2] {2, 8}> ()
    zero = Constant <value = int64[1] {0}> ()
    two = Constant <value = int64[1] {2}> ()
    head = Slice (s, zero, two)
    shape = Concat <axis = 0> (head, hd)
    r = Reshape (qb, shape)
    t = Transpose <perm = [0, 2, 1, 3]> (r)
    tt = Transpose <perm = [0, 1, 3, 2]> (t)
    att = MatMul (t, tt)
    sm = Softmax <axis = -1> (att)
    ctx = MatMul (sm, t)
    back = Transpose <perm = [0, 2, 1, 3]> (ctx)
    flat = Reshape (back, s)
    mean = ReduceMean <axes = [-1]> (flat)
    dev = Sub (flat, mean)
    sq = Mul (dev, dev)
    var = ReduceMean <axes = [-1]> (sq)
    eps = Constant <value = float {1e-5}> ()
    ve = Add (var, eps)
    sd = Sqrt (ve)
    norm = Div (dev, sd)
    half = Constant <value = float {0.5}> ()
    rt2 = Constant <value = float {1.4142135}> ()
    e = Div (norm, rt2)
    er = Erf (e)
    one = Constant <value = float {1.0}> ()
    ep = Add (er, one)
    gx = Mul (norm, ep)
    g = Mul (gx, half)
    y = Add (g, x)
}""",
        {
            "wq": rng.normal(size=(16, 16)).astype(np.float32) / 4,
            "bq": rng.normal(size=16).astype(np.float32),
        },
    )


def _if_model(rng: np.random.Generator) -> onnx.ModelProto:
    return _model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[2,4] x, bool c) => (float[2,4] y) {
    y = If (c) <
        then_branch = t () => (float[2,4] a) {
            k = Constant <value = float {1.0}> ()
            m = Mul (x, k)
            a = Add (m, w)
        },
        else_branch = e () => (float[2,4] b) {
            n = Neg (x)
            b = Relu (n)
        }
    >
}""",
        {"w": rng.normal(size=(2, 4)).astype(np.float32)},
    )


def _loop_model(rng: np.random.Generator) -> onnx.ModelProto:
    return _model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[3] x) => (float[3] y, float[4,3] scan) {
    n = Constant <value = int64 {4}> ()
    c = Constant <value = bool {1}> ()
    y, scan = Loop (n, c, x) <body = b (int64 i, bool cin, float[3] s) => (bool cout, float[3] t, float[3] u) {
        cout = Identity (cin)
        one = Constant <value = float {1.0}> ()
        t = Add (s, w)
        z = Mul (t, one)
        u = Identity (z)
    }>
}""",
        {"w": rng.normal(size=3).astype(np.float32)},
    )


def _shape_chain(rng: np.random.Generator) -> onnx.ModelProto:
    return _model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[N,6] x) => (float[N,3,2] y) {
    s = Shape (x)
    i0 = Constant <value = int64 {0}> ()
    d0 = Gather (s, i0)
    u = Unsqueeze (d0, ax)
    tail = Constant <value = int64[2] {3, 2}> ()
    shp = Concat <axis = 0> (u, tail)
    r = Reshape (x, shp)
    f = ConstantOfShape <value = float[1] {0.5}> (tail)
    a = Add (r, f)
    ci = Cast <to = 7> (a)
    cf = Cast <to = 1> (ci)
    y = Max (cf, a)
}""",
        {"ax": np.array([0], np.int64)},
    )


BUILDERS: dict[str, Callable[[np.random.Generator], onnx.ModelProto]] = {
    "built:conv-bn": _conv_bn,
    "built:conv-hardswish": _conv_hardswish,
    "built:transformer-block": _transformer_block,
    "built:if": _if_model,
    "built:loop": _loop_model,
    "built:shape-chain": _shape_chain,
}


class Bases:
    """The base models, built or read once each, handed out as fresh copies."""

    def __init__(self) -> None:
        self._cache: dict[str, onnx.ModelProto] = {}

    def get(self, name: str) -> onnx.ModelProto:
        if name not in self._cache:
            if name in BUILDERS:
                self._cache[name] = BUILDERS[name](np.random.default_rng(0))
            else:
                path = ZOO / f"{name.removeprefix('zoo:')}.onnx"
                if not path.exists():
                    raise SystemExit(f"{path} is missing: run `make models`, or pass --no-zoo")
                self._cache[name] = onnx.load(str(path))
        copy = onnx.ModelProto()
        copy.CopyFrom(self._cache[name])
        return copy


# ---------------------------------------------------------------------------------------------
# Mutations


def _graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The main graph and every subgraph, outermost first."""
    found: list[onnx.GraphProto] = []

    def walk(graph: onnx.GraphProto) -> None:
        found.append(graph)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def _pick(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def _graph_with_nodes(rng: np.random.Generator, model: onnx.ModelProto) -> onnx.GraphProto | None:
    graphs = [g for g in _graphs(model) if len(g.node)]
    return _pick(rng, graphs) if graphs else None


def _tensor_names(graph: onnx.GraphProto) -> list[str]:
    names = [v.name for v in graph.input] + [t.name for t in graph.initializer]
    names += [o for n in graph.node for o in n.output if o]
    return names


def _drop_node(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    graph = _graph_with_nodes(rng, model)
    if graph is None:
        return "no node"
    index = int(rng.integers(len(graph.node)))
    node = graph.node[index]
    op = node.op_type
    bypass = rng.random() < 0.5 and len(node.input) and node.input[0] and len(node.output)
    if bypass:  # its readers read its first input instead: more often still a valid model
        old, new = node.output[0], node.input[0]
        for g in _graphs(model):
            for reader in g.node:
                for i, name in enumerate(reader.input):
                    if name == old:
                        reader.input[i] = new
            for value in g.output:
                if value.name == old:
                    value.name = new
    del graph.node[index]
    return f"dropped {op} #{index}" + (" (readers bypassed to its input)" if bypass else "")


def _duplicate_node(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    graph = _graph_with_nodes(rng, model)
    if graph is None:
        return "no node"
    index = int(rng.integers(len(graph.node)))
    copy = onnx.NodeProto()
    copy.CopyFrom(graph.node[index])
    fresh = rng.random() < 0.5
    if fresh:
        for i, out in enumerate(copy.output):
            if out:
                copy.output[i] = f"{out}__dup"
        copy.name = f"{copy.name}__dup" if copy.name else ""
    graph.node.insert(index + 1, copy)
    return f"duplicated {copy.op_type} #{index} ({'fresh outputs' if fresh else 'same outputs'})"


def _rewire_input(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    graph = _graph_with_nodes(rng, model)
    if graph is None:
        return "no node"
    nodes = [n for n in graph.node if len(n.input)] or list(graph.node)
    node = _pick(rng, nodes)
    roll = rng.random()
    target = (
        "" if roll < 0.1 else "no_such_tensor" if roll < 0.2 else _pick(rng, _tensor_names(graph))
    )
    if not len(node.input):
        node.input.append(target)
        return f"{node.op_type}: added input {target!r}"
    slot = int(rng.integers(len(node.input)))
    node.input[slot] = target
    return f"{node.op_type}: input {slot} -> {target!r}"


def _rewire_output(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    graph = model.graph
    if not len(graph.output):
        return "no output"
    value = _pick(rng, list(graph.output))
    names = _tensor_names(graph)
    value.name = _pick(rng, names) if names else "x"
    if rng.random() < 0.5:
        value.type.tensor_type.ClearField("shape")
    return f"output -> {value.name!r}"


_INTS = (0, 1, -1, 2, 3, -2, 7, 64, 2**31, 2**63 - 1, -(2**63))
_FLOATS = (0.0, -1.0, 1.0, 0.5, 1e30, -1e-30, math.nan, math.inf, -math.inf)


def _attribute_value(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    nodes = [n for g in _graphs(model) for n in g.node if len(n.attribute)]
    if not nodes:
        return "no attribute"
    node = _pick(rng, nodes)
    attr = _pick(rng, list(node.attribute))
    kind = attr.type
    if kind == onnx.AttributeProto.INT:
        attr.i = int(_pick(rng, _INTS))
        new: object = attr.i
    elif kind == onnx.AttributeProto.FLOAT:
        attr.f = float(_pick(rng, _FLOATS))
        new = attr.f
    elif kind == onnx.AttributeProto.INTS:
        values = list(attr.ints)
        roll = rng.random()
        if roll < 0.3 and values:
            values.pop(int(rng.integers(len(values))))
        elif roll < 0.6:
            values.append(int(_pick(rng, _INTS)))
        elif values:
            values[int(rng.integers(len(values)))] = int(_pick(rng, _INTS))
        del attr.ints[:]
        attr.ints.extend(values)
        new = values
    elif kind == onnx.AttributeProto.FLOATS:
        attr.floats.append(float(_pick(rng, _FLOATS)))
        new = list(attr.floats)
    elif kind == onnx.AttributeProto.STRING:
        attr.s = _pick(rng, (b"", b"nearest", b"linear", b"constant", b"reflect", b"\xff\xfe"))
        new = attr.s
    elif kind == onnx.AttributeProto.TENSOR:
        tensor = attr.t
        if rng.random() < 0.5 and tensor.dims:
            tensor.dims[int(rng.integers(len(tensor.dims)))] = int(_pick(rng, (0, 2, 5, 2**40)))
        else:
            _set_tensor(rng, tensor, int(_pick(rng, _INTS)), tensor.data_type)
        new = f"tensor dims {list(tensor.dims)}"
    else:
        return f"{node.op_type}.{attr.name}: left alone (type {kind})"
    return f"{node.op_type}.{attr.name} = {new!r}"[:160]


def _set_tensor(rng: np.random.Generator, tensor: onnx.TensorProto, value: int, dtype: int) -> None:
    """Make `tensor` a scalar or 1-element vector of `value` in `dtype` (where numpy can)."""
    try:
        array = np.array(value).astype(helper.tensor_dtype_to_np_dtype(dtype))
    except Exception:
        array = np.array(value, np.int64)
    if rng.random() < 0.5:
        array = array.reshape(1)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _attribute_type(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    nodes = [n for g in _graphs(model) for n in g.node]
    if not nodes:
        return "no node"
    node = _pick(rng, nodes)
    if not len(node.attribute) or rng.random() < 0.3:
        name = _pick(rng, ATTRIBUTE_NAMES)
        value: object = _pick(rng, (1, 0.5, "x", [0, 1], [0.5]))
        node.attribute.append(helper.make_attribute(name, value))
        return f"{node.op_type}: added attribute {name}={value!r}"
    attr = _pick(rng, list(node.attribute))
    types = [t for t in onnx.AttributeProto.AttributeType.values() if t != attr.type]
    attr.type = int(_pick(rng, types))
    if rng.random() < 0.5:  # also fill the field the new type reads
        kind = attr.type
        if kind == onnx.AttributeProto.INT:
            attr.i = 1
        elif kind == onnx.AttributeProto.FLOAT:
            attr.f = 1.0
        elif kind == onnx.AttributeProto.STRING:
            attr.s = b"x"
        elif kind == onnx.AttributeProto.INTS:
            attr.ints.extend([1, 2])
        elif kind == onnx.AttributeProto.TENSOR:
            attr.t.CopyFrom(numpy_helper.from_array(np.array([1.0], np.float32)))
    return (
        f"{node.op_type}.{attr.name}: type -> {onnx.AttributeProto.AttributeType.Name(attr.type)}"
    )


def _initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and the tensors of Constant nodes (exporters such as paddle2onnx write
    every weight as one), in every graph."""
    found = [t for g in _graphs(model) for t in g.initializer]
    for graph in _graphs(model):
        for node in graph.node:
            if node.op_type == "Constant":
                found += [a.t for a in node.attribute if a.HasField("t")]
    return found


def _initializer_dims(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    inits = _initializers(model)
    if not inits:
        return "no initializer"
    tensor = _pick(rng, inits)
    dims = list(tensor.dims)
    count = math.prod(dims)
    roll = rng.random()
    if roll < 0.35 and count > 1:  # same element count, other split
        factor = next((f for f in (2, 3, 5, 7) if count % f == 0), count)
        new = [factor, count // factor] if rng.random() < 0.5 else [count]
    elif roll < 0.55:
        new = [*dims, 1] if rng.random() < 0.5 else [1, *dims]
    elif roll < 0.8 and dims:
        new = list(dims)
        new[int(rng.integers(len(new)))] += int(_pick(rng, (1, -1, 7)))
    else:
        new = dims[::-1] if len(dims) > 1 else [0]
    del tensor.dims[:]
    tensor.dims.extend(new)
    return f"initializer {tensor.name!r}: dims {dims} -> {new}"


_DTYPES = (
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64,
    TensorProto.INT32, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.BFLOAT16,
    TensorProto.STRING, TensorProto.INT4, TensorProto.FLOAT8E4M3FN,
)  # fmt: skip


def _initializer_dtype(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    inits = _initializers(model)
    if not inits:
        return "no initializer"
    tensor = _pick(rng, inits)
    old = tensor.data_type
    roll = rng.random()
    if roll < 0.1:
        tensor.data_type = int(_pick(rng, (0, 99, 40)))
        how = "unknown type"
    elif roll < 0.5:  # the data converted: a valid tensor of another type
        new = int(_pick(rng, _DTYPES))
        try:
            array = numpy_helper.to_array(tensor)
            converted = helper.make_tensor(
                tensor.name, new, array.shape, array.astype(np.float64).reshape(-1).tolist()
            )
            tensor.CopyFrom(converted)
            how = "converted"
        except Exception:
            tensor.data_type = new
            how = "relabelled"
    else:
        tensor.data_type = int(_pick(rng, _DTYPES))
        how = "relabelled"
    return f"initializer {tensor.name!r}: type {old} -> {tensor.data_type} ({how})"


def _input_type(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in inits]
    if not inputs:
        return "no input"
    value = _pick(rng, inputs)
    tensor_type = value.type.tensor_type
    roll = rng.random()
    if roll < 0.4:
        tensor_type.elem_type = int(_pick(rng, (*_DTYPES, 99)))
        return f"input {value.name!r}: elem_type -> {tensor_type.elem_type}"
    dims = tensor_type.shape.dim
    if roll < 0.6 or not len(dims):
        dims.add().dim_value = int(_pick(rng, (1, 2, 3)))
    elif roll < 0.8:
        dims[int(rng.integers(len(dims)))].dim_value = int(_pick(rng, (0, 1, 5, 2**40)))
    else:
        dims[int(rng.integers(len(dims)))].dim_param = "fuzz"
    return f"input {value.name!r}: dims -> {[d.dim_value or d.dim_param for d in dims]}"


def _op_type(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    graph = _graph_with_nodes(rng, model)
    if graph is None:
        return "no node"
    node = _pick(rng, list(graph.node))
    old = node.op_type
    node.op_type = _pick(rng, OP_TYPES)
    return f"op {old} -> {node.op_type}"


def _opset(rng: np.random.Generator, model: onnx.ModelProto) -> str:
    if rng.random() < 0.25:
        model.ir_version = int(_pick(rng, (1, 3, 4, 7, 9, 10, 11, 12, 99)))
        return f"ir_version -> {model.ir_version}"
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = int(rng.integers(1, 27))
            return f"opset -> {entry.version}"
    model.opset_import.add(domain="", version=int(rng.integers(1, 27)))
    return "opset added"


MUTATORS: dict[str, Callable[[np.random.Generator, onnx.ModelProto], str]] = {
    "drop-node": _drop_node,
    "duplicate-node": _duplicate_node,
    "rewire-input": _rewire_input,
    "rewire-output": _rewire_output,
    "attribute-value": _attribute_value,
    "attribute-type": _attribute_type,
    "initializer-dims": _initializer_dims,
    "initializer-dtype": _initializer_dtype,
    "input-type": _input_type,
    "op-type": _op_type,
    "opset": _opset,
}


def _corrupt_bytes(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    buf = bytearray(data)
    roll = rng.random()
    if roll < 0.4:
        positions = rng.integers(len(buf), size=int(rng.integers(1, 9)))
        for p in positions:
            buf[int(p)] ^= 1 << int(rng.integers(8))
        return bytes(buf), f"flipped {len(positions)} bit(s)"
    if roll < 0.6:
        cut = int(rng.integers(len(buf)))
        return bytes(buf[:cut]), f"cut at {cut} of {len(buf)}"
    start = int(rng.integers(len(buf)))
    length = int(rng.integers(1, 65))
    if roll < 0.8:
        buf[start : start + length] = bytes(len(buf[start : start + length]))
        return bytes(buf), f"zeroed {length} bytes at {start}"
    return bytes(buf[: start + length] + buf[start:]), f"repeated {length} bytes at {start}"


@dataclass
class Mutant:
    """One case: its id, base model, what was done to it, and its bytes."""

    case: str
    base: str
    steps: list[str]
    data: bytes = field(repr=False, default=b"")


def make_mutant(
    seed: int, index: int, bases: Bases, names: list[str], weights: np.ndarray
) -> Mutant:
    """Mutant `index` of `seed`: the same on every run (module docstring)."""
    rng = np.random.default_rng([seed, index])
    base = names[int(rng.choice(len(names), p=weights))]
    model = bases.get(base)
    steps = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))):
        kind = _pick(rng, MUTATIONS)
        steps.append(f"{kind}: {MUTATORS[kind](rng, model)}")
    try:
        data = model.SerializeToString()
    except Exception as exc:  # a mutation protobuf cannot encode (e.g. an invalid enum)
        data = b""
        steps.append(f"unserializable ({type(exc).__name__})")
    if data and rng.random() < 0.12:
        data, what = _corrupt_bytes(rng, data)
        steps.append(f"corrupt-bytes: {what}")
    return Mutant(f"{seed}:{index}", base, steps, data)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Result:
    """What one mutant did."""

    case: str
    base: str
    steps: list[str]
    outcome: str
    exit_code: int | None
    seconds: float
    message: str = ""


def _child(argv: list[str], stdout: Path, stderr: Path, memory_bytes: int) -> NoReturn:
    """Run the CLI in this (forked) process with its output in files; never returns."""
    code = 1
    try:
        for fd, path in ((1, stdout), (2, stderr)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        from onnxshrink.cli import main

        sys.argv = ["onnxshrink", *argv]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _loads(paths: list[Path]) -> NoReturn:
    """Child: exit status bit i set when ONNX Runtime cannot load paths[i]."""
    import onnxruntime as ort

    status = 0
    for i, path in enumerate(paths):
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 4
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except BaseException:
            status |= 1 << i
    os._exit(status)


def _fork(target: Callable[[], NoReturn], cpus: set[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            os.sched_setaffinity(0, cpus)
            target()
        finally:
            os._exit(99)
    return pid


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit status (negative: killed by that signal), None when it timed out."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)  # the child's own process group: it and its threads
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def _classify(code: int | None, stderr: str) -> tuple[str, str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    message = errors[0] if errors else (lines[-1] if lines else "")
    if code is None:
        return "hang", message
    if "Traceback (most recent call last)" in stderr:
        tail = [line for line in lines if not line.startswith(" ")]
        return "crash", tail[-1] if tail else message
    if code < 0:
        return "crash", f"killed by signal {-code}"
    if code not in (0, 1, 2) or len(errors) > 1 or (code in (1, 2) and not errors):
        return "crash", f"exit {code}: {message}"
    if code == 2:
        return "refused", message
    if code == 1:
        if "internal error" in message:
            return "internal-error", message
        if any(text in message for text in _REWRITE_FAILURES):
            return "rewrite-rejected", message
        if "exceeded the time limit" in message:
            return "time-limit", message
        return "failed", message
    return "optimized", message


def run_mutant(
    mutant: Mutant, workdir: Path, time_limit: float, wall: float, memory: int, cpus: set[int]
) -> Result:
    """Run one mutant through `onnxshrink optimize` (module docstring) and classify it."""
    folder = Path(tempfile.mkdtemp(prefix="case-", dir=workdir))
    source = folder / "mutant.onnx"
    source.write_bytes(mutant.data)
    digest = hashlib.sha256(mutant.data).hexdigest()
    output = folder / "out.onnx"
    stdout, stderr = workdir / f"{folder.name}.out", workdir / f"{folder.name}.err"
    argv = ["optimize", str(source), "-o", str(output), "--time-limit", f"{time_limit:g}"]
    start = time.perf_counter()
    pid = _fork(lambda: _child(argv, stdout, stderr, memory), cpus)
    code = _wait(pid, wall)
    seconds = time.perf_counter() - start
    err_text = stderr.read_text(errors="replace")
    outcome, message = _classify(code, err_text)
    if hashlib.sha256(source.read_bytes()).hexdigest() != digest:
        outcome, message = "input-modified", "the input file changed"
    leftovers = [p.name for p in folder.iterdir() if p.name not in ("mutant.onnx", "out.onnx")]
    if leftovers and outcome not in ("hang", "crash"):
        outcome, message = "temp-left", f"left behind: {', '.join(leftovers)}"
    if outcome == "optimized":
        if not output.exists():
            outcome, message = "crash", "exit 0 but no output file"
        else:
            status = _wait(_fork(lambda: _loads([source, output]), cpus), wall)
            if status is None or status < 0:
                outcome, message = "crash", f"ONNX Runtime load check: {status}"
            elif status & 2 and not status & 1:
                outcome, message = "unloadable-output", "ORT loads the mutant but not the output"
    for path in (stdout, stderr):
        path.unlink(missing_ok=True)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return Result(mutant.case, mutant.base, mutant.steps, outcome, code, seconds, message[:300])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="mutants to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first mutant index")
    parser.add_argument("--case", action="append", default=[], help="run only S:K (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants at a time (and CPUs used)")
    parser.add_argument("--time-limit", type=float, default=10.0, help="optimize --time-limit")
    parser.add_argument("--wall", type=float, default=90.0, help="seconds before a run is a hang")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="address-space limit per run")
    parser.add_argument("--no-zoo", action="store_true", help="built models only")
    parser.add_argument("--keep", type=Path, help="save the bad mutants (and --case ones) here")
    parser.add_argument("--json", type=Path, help="write every result as JSON")
    args = parser.parse_args()

    import onnxruntime  # noqa: F401  (loaded once here, before the forks)

    import onnxshrink.cli  # noqa: F401
    import onnxshrink.engine.optimize  # noqa: F401
    import onnxshrink.rules  # noqa: F401

    names = [n for n in BASES if not (args.no_zoo and n.startswith("zoo:"))]
    weights = np.array([BASES[n] for n in names])
    weights = weights / weights.sum()
    cases = (
        [tuple(int(p) for p in c.split(":")) for c in args.case]
        if args.case
        else [(args.seed, k) for k in range(args.start, args.start + args.count)]
    )
    available = sorted(os.sched_getaffinity(0))
    cpus = set(available[: max(1, args.jobs)])
    bases = Bases()
    workdir = Path(tempfile.mkdtemp(prefix="onnxshrink-fuzz-"))
    memory = int(args.memory_gb * 2**30)
    results: list[Result] = []
    running: dict[int, Mutant] = {}
    began = time.perf_counter()
    print(
        f"fuzz: {len(cases)} mutant(s), seed {args.seed}, {args.jobs} job(s) on CPU(s) "
        f"{sorted(cpus)}, --time-limit {args.time_limit:g} s, wall {args.wall:g} s",
        flush=True,
    )
    # Each mutant runs in a worker forked for it (which forks the CLI child), so that --jobs
    # of them run at once; a worker leaves its result in a file named after its pid.
    pending = list(cases)
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            seed, index = pending.pop(0)
            mutant = make_mutant(seed, index, bases, names, weights)
            if args.keep is not None and args.case:
                _keep(args.keep, mutant)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                result = run_mutant(mutant, workdir, args.time_limit, args.wall, memory, cpus)
                (workdir / f"{os.getpid()}.json").write_text(json.dumps(asdict(result)))
                os._exit(0)
            running[pid] = mutant
        pid, _ = os.wait()
        mutant = running.pop(pid)
        record = workdir / f"{pid}.json"
        if record.exists():
            result = Result(**json.loads(record.read_text()))
            record.unlink()
        else:
            result = Result(
                mutant.case, mutant.base, mutant.steps, "crash", None, 0.0, "worker died"
            )
        results.append(result)
        if result.outcome in BAD and args.keep is not None:
            _keep(args.keep, mutant)
        done = len(results)
        if result.outcome in BAD or done % 50 == 0 or args.case:
            print(
                f"[{done}/{len(cases)} {time.perf_counter() - began:.0f} s] {result.case} "
                f"{result.base}: {result.outcome} {result.message}",
                flush=True,
            )
    _report(results, time.perf_counter() - began)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    os.rmdir(workdir)
    return 1 if any(r.outcome in BAD for r in results) else 0


def _keep(folder: Path, mutant: Mutant) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = mutant.case.replace(":", "_")
    (folder / f"{name}.onnx").write_bytes(mutant.data)
    (folder / f"{name}.txt").write_text(f"{mutant.base}\n" + "\n".join(mutant.steps) + "\n")


def _report(results: list[Result], seconds: float) -> None:
    counts = Counter(r.outcome for r in results)
    print(f"\n{len(results)} mutants in {seconds:.0f} s")
    for outcome in ("refused", "failed", "time-limit", "optimized", *BAD):
        print(f"  {outcome:18} {counts.get(outcome, 0):6}")
    by_mutation: Counter[tuple[str, str]] = Counter()
    for r in results:
        for step in r.steps:
            by_mutation[(step.split(":")[0], r.outcome)] += 1
    print("\nby mutation (a mutant with several mutations counts under each):")
    kinds = sorted({k for k, _ in by_mutation})
    outcomes = [o for o in ("refused", "failed", "time-limit", "optimized", *BAD) if counts.get(o)]
    print(f"  {'mutation':20}" + "".join(f"{o:>19}" for o in outcomes))
    for kind in kinds:
        print(f"  {kind:20}" + "".join(f"{by_mutation[(kind, o)]:>19}" for o in outcomes))
    slow = sorted(results, key=lambda r: -r.seconds)[:5]
    print("\nslowest: " + ", ".join(f"{r.case} {r.base} {r.seconds:.1f} s" for r in slow))
    bad = [r for r in results if r.outcome in BAD]
    if bad:
        print(f"\n{len(bad)} bad case(s) (rerun one with --case S:K --keep DIR):")
        for r in bad:
            print(f"  {r.case} {r.base} {r.outcome}: {r.message}")
            for step in r.steps:
                print(f"      {step}")


if __name__ == "__main__":
    sys.exit(main())
