"""Symbolic shape refinement: name equal dynamic dims alike, and give shapes where onnx has none.

onnx's shape inference leaves a dim unknown (or gives it a fresh name) as soon as it would take
arithmetic to know it: the `-1` of a Reshape, a dim that only equals another by an identity
such as `(a * b * c) / c = a * b`, and every output of an op it has no schema for (an ONNX
Runtime contrib op such as `com.microsoft.DynamicQuantizeLSTM`). This pass works the dims out
again, on the graph's own tensors, so that the rules that read `tensor.shape` (constant folding
of shape computations and Reshape targets, reshape merging, the Transpose-as-Reshape rule) see
that two dims are the same runtime value. It never changes a node; it reports no modification,
like shape inference itself (it runs after it, every sweep).

1. Dims are monomials: an integer coefficient times a product of symbols. A symbol is one
   runtime dim value; symbols proven equal are merged (union-find). Each dim written back is an
   int, or the name of its symbol's class (a name onnx gave where it gave one, else
   `onnxshrink_dim_N`); a product such as `3 * T` is kept for the arithmetic of later dims, and
   written back as onnx had it.
2. Graph inputs are the contract: their declared dims (ints, names) are taken as they are.
   Declared graph *output* shapes are never used as evidence: exporters write wrong ones (a
   CRNN declaring [1, seqlen] for a [T, 1, C] result), and trusting them would change what the
   model computes.
3. Per node, in topological order, the output dims follow from the input dims for the ops
   modelled here: unary and elementwise ops (same dims), broadcasting binary ops (equal dims,
   or the one that is not 1), Transpose, Reshape with a constant target (0 copies, -1 is the
   element count divided by the other entries, when that division is exact as monomials),
   Flatten, Squeeze/Unsqueeze with constant axes, MatMul/MatMulInteger/Gemm, Concat (the
   non-concatenated dims; the concatenated one when all parts are ints), and the recurrent ops
   LSTM/GRU/RNN and `com.microsoft.DynamicQuantizeLSTM` (the same shape contract as LSTM).
4. For every other op, onnx's inferred dims are taken: ints as ints, a name as a symbol of that
   name (equal names are equal dims, ONNX's rule), anything else as a fresh symbol per tensor
   and axis. Where both this pass and onnx know a dim, a named onnx dim is merged with the
   derived symbol (both denote the same value), and an int from either side wins.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    all_graphs,
    input_or_attr,
    int_list,
    is_default_domain,
    is_static_dim,
)
from onnxshrink.engine.passes import RuleContext

logger = logging.getLogger(__name__)

_FRESH_PREFIX = "onnxshrink_dim_"


# ---------------------------------------------------------------------------------------------
# Case 1: monomial dims over merged symbols


class _Symbols:
    """Union-find over symbol ids; each class keeps the best name it has seen."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.names: list[str | None] = []
        self.by_name: dict[str, int] = {}

    def new(self, name: str | None = None) -> int:
        if name is not None and name in self.by_name:
            return self.find(self.by_name[name])
        self.parent.append(len(self.parent))
        self.names.append(name)
        if name is not None:
            self.by_name[name] = len(self.parent) - 1
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.names[ra] is None:  # keep a real name as the class's name
            ra, rb = rb, ra
        self.parent[rb] = ra

    def name(self, s: int) -> str:
        root = self.find(s)
        if self.names[root] is None:
            self.names[root] = f"{_FRESH_PREFIX}{root}"
        return str(self.names[root])


@dataclass(frozen=True)
class _Mono:
    """`coef * product(symbols)`; symbols as a sorted tuple of class roots at creation time."""

    coef: int
    symbols: tuple[int, ...] = ()


_Dims = list[_Mono] | None


def _canon(m: _Mono, syms: _Symbols) -> _Mono:
    return _Mono(m.coef, tuple(sorted(syms.find(s) for s in m.symbols)))


def _mul(a: _Mono, b: _Mono, syms: _Symbols) -> _Mono:
    return _canon(_Mono(a.coef * b.coef, a.symbols + b.symbols), syms)


def _div(a: _Mono, b: _Mono, syms: _Symbols) -> _Mono | None:
    """`a / b` when it is exact as monomials, else None."""
    a, b = _canon(a, syms), _canon(b, syms)
    if b.coef == 0 or a.coef % b.coef:
        return None
    left = Counter(a.symbols)
    left.subtract(b.symbols)
    if any(v < 0 for v in left.values()):
        return None
    return _Mono(a.coef // b.coef, tuple(sorted(left.elements())))


def _same(a: _Mono, b: _Mono, syms: _Symbols) -> bool:
    return _canon(a, syms) == _canon(b, syms)


def _single(m: _Mono) -> int | None:
    """The symbol of a dim that is exactly one symbol (coefficient 1), else None."""
    return m.symbols[0] if m.coef == 1 and len(m.symbols) == 1 else None


def _is_int(m: _Mono, value: int | None = None) -> bool:
    return not m.symbols and (value is None or m.coef == value)


# ---------------------------------------------------------------------------------------------
# The pass


def refine_shapes(graph: gs.Graph, ctx: RuleContext) -> bool:
    """Write refined shapes onto the intermediate tensors of `graph` and its subgraphs.

    Returns False: the graph's nodes are unchanged (the shapes are an analysis, like inference).
    """
    syms = _Symbols()
    dims: dict[int, _Dims] = {}
    for sub in all_graphs(graph):
        _refine_graph(sub, ctx.opset, syms, dims)
    return False


def _refine_graph(graph: gs.Graph, opset: int, syms: _Symbols, dims: dict[int, _Dims]) -> None:
    outputs = {id(t) for t in graph.outputs}
    inputs = {id(t) for t in graph.inputs}

    def read(tensor: gs.Tensor) -> _Dims:
        if id(tensor) not in dims:
            # Case 2: a declared graph output is no evidence; read as unknown.
            trusted = id(tensor) not in outputs or id(tensor) in inputs
            dims[id(tensor)] = _from_shape(tensor, syms) if trusted else None
        return dims[id(tensor)]

    for node in graph.nodes:
        derived = _derive(node, read, syms, opset)
        for index, out in enumerate(node.outputs):
            if out.is_empty() or isinstance(out, gs.Constant):
                continue
            mine = derived[index] if derived is not None and index < len(derived) else None
            graph_output = id(out) in outputs
            inferred = None if graph_output else _from_shape(out, syms)
            merged = _merge(mine, inferred, syms)
            dims[id(out)] = merged
    for node in graph.nodes:
        for out in node.outputs:
            if id(out) in outputs or out.is_empty() or isinstance(out, gs.Constant):
                continue
            refined = dims.get(id(out))
            if refined is not None:
                olds = _old(out, refined)
                out.shape = [_written(m, syms, old) for m, old in zip(refined, olds, strict=True)]


def _old(tensor: gs.Tensor, refined: list[_Mono]) -> list:
    shape = tensor.shape
    if shape is None or len(shape) != len(refined):
        return [None] * len(refined)
    return list(shape)


def _written(m: _Mono, syms: _Symbols, old: object) -> object:
    """Case 1: an int, a class name, or the old dim when the monomial is not a single symbol."""
    if not m.symbols:
        return m.coef
    if m.coef == 1 and len(m.symbols) == 1:
        return syms.name(m.symbols[0])
    return old


def _from_shape(tensor: gs.Tensor, syms: _Symbols) -> _Dims:
    """Cases 2 and 4: dims from `tensor.shape` (declared or inferred)."""
    if isinstance(tensor, gs.Constant):
        return [_Mono(int(d)) for d in tensor.shape]
    shape = tensor.shape
    if shape is None:
        return None
    result = []
    for dim in shape:
        if is_static_dim(dim):
            result.append(_Mono(int(dim)))
        elif isinstance(dim, str) and dim not in ("", "?") and not dim.startswith(_FRESH_PREFIX):
            result.append(_Mono(1, (syms.new(dim),)))
        else:
            result.append(_Mono(1, (syms.new(),)))
    return result


def _merge(mine: _Dims, inferred: _Dims, syms: _Symbols) -> _Dims:
    """Case 4: combine derived and inferred dims axis by axis."""
    if mine is None:
        return inferred
    if inferred is None or len(inferred) != len(mine):
        return mine
    merged = []
    for a, b in zip(mine, inferred, strict=True):
        if _is_int(a) and _is_int(b) and a.coef != b.coef:
            return inferred  # a contradiction: trust neither derivation, keep onnx's
        if _is_int(b):
            merged.append(b)
        else:
            sa, sb = _single(a), _single(b)
            if sa is not None and sb is not None:
                syms.union(sa, sb)
            merged.append(a)
    return merged


# ---------------------------------------------------------------------------------------------
# Case 3: the modelled ops

_SAME_AS_FIRST = frozenset(
    {
        "Identity", "Cast", "CastLike", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Floor",
        "Ceil", "Round", "Sign", "Not", "Clip", "Softmax", "LogSoftmax", "Gelu", "Elu", "Selu",
        "Softplus", "Softsign", "Mish", "Sin", "Cos", "Dropout", "BatchNormalization",
        "LayerNormalization", "InstanceNormalization", "QuantizeLinear", "DequantizeLinear",
        "DynamicQuantizeLinear", "IsNaN", "IsInf",
    }
)  # fmt: skip
_BROADCAST = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Less",
        "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Where",
    }
)  # fmt: skip
_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})

_Reader = Callable[[gs.Tensor], _Dims]


def _derive(node: gs.Node, read: _Reader, syms: _Symbols, opset: int) -> list[_Dims] | None:
    """The output dims of `node` from its inputs' (case 3), or None when not modelled."""
    if not node.inputs or node.inputs[0].is_empty():
        return None
    if node.domain == "com.microsoft" and node.op == "DynamicQuantizeLSTM":
        return _recurrent(node, read)
    if not is_default_domain(node):
        return None
    op = node.op
    try:
        if op in _SAME_AS_FIRST:
            return [read(node.inputs[0])]
        if op in _BROADCAST:
            return [_broadcast([read(t) for t in node.inputs if not t.is_empty()], syms)]
        if op == "Transpose":
            x = read(node.inputs[0])
            if x is None:
                return None
            perm = node.attrs.get("perm")
            perm = list(perm) if perm is not None else list(reversed(range(len(x))))
            return [[x[p] for p in perm]] if sorted(perm) == list(range(len(x))) else None
        if op == "Reshape":
            return [_reshape(node, read, syms)]
        if op == "Flatten":
            x = read(node.inputs[0])
            if x is None:
                return None
            axis = int(node.attrs.get("axis", 1))
            axis = axis + len(x) if axis < 0 else axis
            return [[_product(x[:axis], syms), _product(x[axis:], syms)]]
        if op in ("Squeeze", "Unsqueeze"):
            return [_squeeze_unsqueeze(node, read, opset)]
        if op in ("MatMul", "MatMulInteger"):
            return [_matmul(read(node.inputs[0]), read(node.inputs[1]), syms)]
        if op == "Gemm":
            return [_gemm(node, read)]
        if op == "Concat":
            return [_concat(node, read, syms)]
        if op in _RECURRENT:
            return _recurrent(node, read)
    except (IndexError, ValueError, TypeError, KeyError):
        return None
    return None


def _product(values: list[_Mono], syms: _Symbols) -> _Mono:
    result = _Mono(1)
    for v in values:
        result = _mul(result, v, syms)
    return result


def _broadcast(shapes: list[_Dims], syms: _Symbols) -> _Dims:
    if not shapes or any(s is None for s in shapes):
        return None
    known = [s for s in shapes if s is not None]
    rank = max(len(s) for s in known)
    result: list[_Mono] = []
    for axis in range(rank):
        column = [s[len(s) - rank + axis] for s in known if len(s) - rank + axis >= 0]
        real = [d for d in column if not _is_int(d, 1)]
        if not real:
            result.append(_Mono(1))
            continue
        first = real[0]
        if all(_same(d, first, syms) for d in real):
            result.append(first)
            continue
        statics = [d for d in real if _is_int(d)]
        # A valid model broadcasts symbols against a static dim > 1 only when they equal it
        # (or are 1): the result is the static dim.
        result.append(statics[0] if statics else _Mono(1, (syms.new(),)))
    return result


def _reshape(node: gs.Node, read: _Reader, syms: _Symbols) -> _Dims:
    if len(node.inputs) < 2:
        return None
    target = int_list(node.inputs[1])
    x = read(node.inputs[0])
    if target is None or x is None or target.count(-1) > 1:
        return None
    allowzero = bool(node.attrs.get("allowzero", 0))
    result: list[_Mono] = []
    for i, entry in enumerate(target):
        if entry == 0 and not allowzero:
            if i >= len(x):
                return None
            result.append(x[i])
        elif entry < 0 and entry != -1:
            return None
        else:
            result.append(_Mono(entry))  # -1 is a placeholder, replaced below
    if -1 in target:
        at = target.index(-1)
        others = _product([r for i, r in enumerate(result) if i != at], syms)
        inferred = _div(_product(x, syms), others, syms)
        # Not exact as monomials (an ill-formed model, or dims this pass cannot see): fresh.
        result[at] = inferred if inferred is not None else _Mono(1, (syms.new(),))
    return result


def _squeeze_unsqueeze(node: gs.Node, read: _Reader, opset: int) -> _Dims:
    x = read(node.inputs[0])
    present, axes = input_or_attr(node, opset, 1, "axes", input_since=13)
    if x is None or axes is None:
        return None
    if node.op == "Unsqueeze":
        rank = len(x) + len(axes)
        norm = sorted(a + rank if a < 0 else a for a in axes)
        out = list(x)
        for a in norm:
            out.insert(a, _Mono(1))
        return out
    norm_set = {a + len(x) if a < 0 else a for a in axes}
    if any(not _is_int(x[a], 1) for a in norm_set):
        return None
    return [d for i, d in enumerate(x) if i not in norm_set]


def _matmul(a: _Dims, b: _Dims, syms: _Symbols) -> _Dims:
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    batch = _broadcast([a[:-2], b[:-2]], syms) if len(a) > 2 or len(b) > 2 else []
    if batch is None:
        return None
    return [*batch, a[-2], b[-1]]


def _gemm(node: gs.Node, read: _Reader) -> _Dims:
    a, b = read(node.inputs[0]), read(node.inputs[1])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m = a[1] if int(node.attrs.get("transA", 0)) else a[0]
    n = b[0] if int(node.attrs.get("transB", 0)) else b[1]
    return [m, n]


def _concat(node: gs.Node, read: _Reader, syms: _Symbols) -> _Dims:
    parts = [read(t) for t in node.inputs if not t.is_empty()]
    if not parts or any(p is None for p in parts):
        return None
    known = [p for p in parts if p is not None]
    rank = len(known[0])
    if any(len(p) != rank for p in known):
        return None
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    result = list(known[0])
    for i in range(rank):
        if i == axis:
            column = [p[i] for p in known]
            total = sum(d.coef for d in column) if all(_is_int(d) for d in column) else None
            result[i] = _Mono(total) if total is not None else _Mono(1, (syms.new(),))
        else:
            # The other dims agree in a valid model: prefer an int, else the first symbol.
            ints = [p[i] for p in known if _is_int(p[i])]
            result[i] = ints[0] if ints else known[0][i]
            if not ints:
                first = _single(known[0][i])
                for p in known[1:]:
                    other = _single(p[i])
                    if first is not None and other is not None:
                        syms.union(first, other)
    return result


def _recurrent(node: gs.Node, read: _Reader) -> list[_Dims] | None:
    """LSTM/GRU/RNN (and DynamicQuantizeLSTM): Y, Y_h (and Y_c) from X and hidden_size."""
    x = read(node.inputs[0])
    hidden = node.attrs.get("hidden_size")
    if x is None or len(x) != 3 or hidden is None:
        return None
    direction = node.attrs.get("direction", "forward")
    if isinstance(direction, bytes):
        direction = direction.decode()
    dirs = _Mono(2 if direction == "bidirectional" else 1)
    h = _Mono(int(hidden))
    if int(node.attrs.get("layout", 0)):
        batch, seq = x[0], x[1]
        y, state = [batch, seq, dirs, h], [batch, dirs, h]
    else:
        seq, batch = x[0], x[1]
        y, state = [seq, dirs, batch, h], [dirs, batch, h]
    return [y, state, state]
