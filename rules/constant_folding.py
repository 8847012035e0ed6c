"""Constant folding: compute at rewrite time what does not depend on the model's inputs.

Five steps per graph (the main graph and every If/Loop/Scan body):

1. Shape values. Integer tensors of rank <= 1 (shape computations) are evaluated *partially*:
   each entry is a known int, the runtime value of one axis of one tensor (`_Dim`), or
   unknown. `Shape(x)` gives x's static dims and `_Dim`s for the symbolic ones; `Cast` (to an
   int type), `Identity`, `Slice`, `Gather`, `Concat`, `Squeeze`, `Unsqueeze`, `Reshape` and
   integer `Add`/`Sub`/`Mul`/`Div`/`Max`/`Min` carry entries through. A tensor whose entries are
   all known becomes a constant, so `Shape(x)[1]` folds when dim 1 of x is static even if
   others are not (onnx-graphsurgeon's own shape folding covers only Shape, Shape->Gather and
   Shape->Slice, and its cast-elision step rewrites int->float->int chains in a way that is
   not exact, so it is not used).
2. Reshape targets. The shape input `s` of a `Reshape` (allowzero=0) whose entries are known
   except for some `_Dim`s is replaced by a constant: an entry that is the Reshape's own input
   dim at the same index (the same axis of the same tensor, or a dim with the same symbolic
   name from shape inference) becomes 0 (copy), and when exactly one unknown entry remains and
   no -1 is present it becomes -1: with all other entries fixed, the element count leaves one
   possible value (edge case: a zero-size tensor, for which -1 is ill-defined; shape values
   of zero-size batches are not supported).
3. Everything else whose inputs are all constant is evaluated by onnx-graphsurgeon's
   `Graph.fold_constants` (ONNX Runtime underneath) with a size guard: a node is excluded when
   its output would be larger than the inputs it frees by more than `_GROWTH_ALLOWANCE` bytes
   (beyond that, growth is charged to a budget of `_GROWTH_BUDGET` of the model's constant
   bytes per run of the pass, shared by all its graphs: a YOLO head's anchor grid, a few KB,
   folds in a 12 MB model; nothing can add more than that fraction to the file)
   (ConstantOfShape, Expand, Tile, Range, broadcasting, Cast to a wider type; an input read by
   k nodes counts for 1/k of its size), so that folding never inflates the model; its readers
   then are not folded either. A node whose arithmetic would take long is excluded as well
   (`_MAX_FOLD_MACS` multiply-adds for Conv, ConvTranspose, MatMul and Gemm, from their input
   shapes): two constant weights can describe hours of work in a few megabytes, and folding
   runs in-process with no time limit. Random ops, Dropout and nodes with subgraphs (a Loop's
   trip count may be 2^63 - 1) are never folded;
   neither are QuantizeLinear/DequantizeLinear (kept as they are by onnx-graphsurgeon). gs is
   called once per graph, with `fold_shapes=False` (step 1 does that) and without flattening
   Ifs, because it does not pass the exclusion callback down to subgraphs itself; a subgraph
   is given the model's IR version for the call (gs would export it with onnx's newest, which
   ONNX Runtime may not read).
4. If nodes with a constant condition (one that step 3 made constant on an earlier round, or
   that was constant already) are replaced by the branch they take: its nodes move into the
   If's graph and its outputs take the If's output tensors (names kept), through an Identity
   where a branch output is an outer tensor or a constant. Moved tensors whose names another
   graph of the model also uses are renamed (sibling scopes may reuse names; one scope may
   not). This is not only a saving: ONNX Runtime inlines such an If when it loads the model,
   and the branch's values then meet their readers' shape inference unhidden (case 5).
5. Range bounds. Range's start, limit and delta are scalars by the spec, but ONNX Runtime's
   kernel takes any one-element tensor, and its shape inference only checks the rank when it
   can read the values (a constant). A bound that step 1, 3 or 4 turned into a constant of
   shape [1] (ONNX's own AffineGrid function takes its sizes out of a shape tensor with
   Split, as [1]) would make a model ORT loaded fail to load; it is replaced by a scalar
   constant of the same value, which also lets step 3 fold the Range.

Constant nodes keep their nodes where `constants_to_initializers` left them (graph outputs,
large constants shared across graphs). For the same reasons a folded value that is a graph
output, or a large one read from several graphs (gs would store it once per graph), is
produced by a new Constant node in the graph of the node it replaces. The pass reports a
change only when a node's output was actually replaced by a constant, a Reshape target or a
Range bound was, or an If was inlined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from onnxshrink.engine.graph import (
    NONDETERMINISTIC_OPS,
    all_graphs,
    const_value,
    forget_names,
    has_subgraphs,
    input_or_attr,
    int_list,
    is_default_domain,
    is_static_dim,
    make_constant,
    node_owners,
    optional_input,
    pack_subbyte_constants,
    producer_of,
    redirect_readers,
    subgraphs_of,
    unique_name,
)
from onnxshrink.engine.passes import RuleContext
from onnxshrink.engine.patterns import may_share

logger = logging.getLogger(__name__)

#: how many bytes a folded output may exceed the constant inputs it replaces by (case 3)
_GROWTH_ALLOWANCE = 1024
#: growth beyond the allowance, for all nodes of one run together, as a share of the model's
#: constant bytes (case 3)
_GROWTH_BUDGET = 0.005
#: shape values longer than this are not tracked (case 1)
_MAX_TRACKED = 64
#: multiply-adds a fold may cost (case 3); about a tenth of a second on one core
_MAX_FOLD_MACS = 2**28

_NEVER_FOLD = NONDETERMINISTIC_OPS | {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}

# Ops whose output is never larger than their largest input (used when shapes are unknown).
_NEVER_GROW = {
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Shape",
    "Size", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Not", "Sign", "Erf", "Sin", "Cos", "ReduceSum", "ReduceMean",
    "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ArgMax", "ArgMin",
    "Softmax", "LogSoftmax",
}  # fmt: skip

_INT_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


def fold_constants(graph: gs.Graph, ctx: RuleContext) -> bool:
    """Fold shape computations and constant subexpressions in `graph` and its subgraphs.

    Returns True only when the graph changed (a tensor became constant, a Reshape target or a
    Range bound was simplified, an If was inlined); a folded value that is a graph output is
    produced by a Constant node.
    """
    changes = _inline_constant_ifs(graph)
    graphs = list(all_graphs(graph))
    for sub in graphs:
        changes += _fold_shape_values(sub, ctx.opset)
    changes += _scalar_range_bounds(graphs)
    constant_nodes = [
        (n, n.outputs[0]) for sub in graphs for n in sub.nodes if n.op == "Constant" and n.outputs
    ]
    folded: list[tuple[gs.Graph, gs.Tensor]] = []
    budget = _Budget(_GROWTH_BUDGET * sum(_constant_bytes(sub) for sub in graphs))
    for sub in graphs:
        folded += _fold_with_gs(sub, graph.ir_version, budget)
    changes += len(folded)
    _restore_constant_nodes(constant_nodes)
    changes += _scalar_range_bounds(graphs)  # bounds step 3 has just made constant
    owners = node_owners(graphs)
    for sub, tensor in folded:
        if not may_share(tensor, _nbytes(tensor) or 0, owners):
            _produce_by_constant_node(sub, tensor)
    for sub in graphs:
        for out in sub.outputs:
            if isinstance(out, gs.Constant):
                _produce_by_constant_node(sub, out)
    return changes > 0


# ---------------------------------------------------------------------------------------------
# Case 1 and 2: partial evaluation of shape values


@dataclass(frozen=True)
class _Dim:
    """The runtime size of axis `axis` of the tensor with id `tensor` (a symbolic dim).

    `symbol` is the dim's name from shape inference when it has a usable one: equal names
    mean equal sizes (ONNX's rule for dim_param), except the placeholders "" and "?".
    """

    tensor: int
    axis: int
    symbol: str | None = None


def _symbol(dim: object) -> str | None:
    return dim if isinstance(dim, str) and dim not in ("", "?") else None


_Entry = int | _Dim | None


@dataclass
class _Partial:
    """A partially known integer tensor of rank 0 (`scalar`) or 1."""

    entries: list[_Entry]
    scalar: bool
    dtype: np.dtype

    def known(self) -> bool:
        return all(isinstance(e, int) for e in self.entries)

    def array(self) -> np.ndarray:
        values = np.array(self.entries, dtype=np.int64).astype(self.dtype)
        return values.reshape(()) if self.scalar else values


def _fold_shape_values(graph: gs.Graph, opset: int) -> int:
    """Cases 1 and 2 on one graph; returns how many tensors or Reshape targets changed."""
    partials: dict[int, _Partial] = {}

    def partial(tensor: gs.Tensor) -> _Partial | None:
        if tensor.is_empty():
            return None
        found = partials.get(id(tensor))
        if found is not None:
            return found
        if isinstance(tensor, gs.Constant) and (
            len(tensor.shape) > 1 or math.prod(tensor.shape) > _MAX_TRACKED
        ):
            return None  # a weight: not a shape value, and not worth loading
        value = const_value(tensor)
        if (
            value is None
            or value.ndim > 1
            or value.size > _MAX_TRACKED
            or not np.issubdtype(value.dtype, np.integer)
        ):
            return None
        return _Partial([int(v) for v in value.reshape(-1)], value.ndim == 0, value.dtype)

    changes = 0
    for node in graph.nodes:
        if not is_default_domain(node) or len(node.outputs) != 1:
            continue
        if node.op == "Reshape" and len(node.inputs) == 2:
            changes += _simplify_reshape_target(graph, node, partial)
        evaluator = _EVALUATORS.get(node.op)
        if evaluator is None:
            continue
        try:
            result = evaluator(node, partial, opset)
        except (IndexError, ValueError, TypeError, OverflowError, ZeroDivisionError):
            result = None
        if result is None or len(result.entries) > _MAX_TRACKED:
            continue
        out = node.outputs[0]
        if result.known():
            if isinstance(out, gs.Constant):
                continue
            out.to_constant(result.array())
            out.inputs.clear()
            changes += 1
        else:
            partials[id(out)] = result
    return changes


def _simplify_reshape_target(graph: gs.Graph, node: gs.Node, partial: Callable) -> int:
    """Case 2: turn a computed Reshape target with symbolic entries into a constant."""
    shape = node.inputs[1]
    if isinstance(shape, gs.Constant) or int(node.attrs.get("allowzero", 0)):
        return 0
    target = partial(shape)
    if target is None or target.scalar or target.known():
        return 0
    data = node.inputs[0]
    data_dims = list(data.shape) if data.shape is not None else []
    entries: list[_Entry] = []
    for i, entry in enumerate(target.entries):
        if isinstance(entry, _Dim) and i < len(data_dims):
            same_axis = entry.tensor == id(data) and entry.axis == i
            same_symbol = entry.symbol is not None and _symbol(data_dims[i]) == entry.symbol
            if same_axis or same_symbol:
                entry = 0  # equals the Reshape's own input dim at the same index: copy it
        entries.append(entry)
    unknown = [i for i, e in enumerate(entries) if not isinstance(e, int)]
    if len(unknown) == 1 and -1 not in entries:
        entries[unknown[0]] = -1
    elif unknown:
        return 0
    node.inputs[1] = make_constant(graph, f"{shape.name}_static", np.array(entries, dtype=np.int64))
    return 1


def _shape(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    dims = node.inputs[0].shape
    if dims is None:
        return None
    start, end = 0, len(dims)
    if opset >= 15:
        start = int(node.attrs.get("start", 0))
        end = int(node.attrs.get("end", len(dims)))
    axes = list(range(len(dims)))[slice(start, end)]
    entries: list[_Entry] = []
    for axis in axes:
        dim = dims[axis]
        entries.append(
            int(dim) if is_static_dim(dim) else _Dim(id(node.inputs[0]), axis, _symbol(dim))
        )
    return _Partial(entries, False, np.dtype(np.int64))


def _size(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    dims = node.inputs[0].shape
    if dims is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        return None
    return _Partial([math.prod(int(d) for d in dims)], True, np.dtype(np.int64))


def _cast(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    source = partial(node.inputs[0])
    to = int(node.attrs.get("to", 0))
    if source is None or to not in _INT_TYPES:
        return None
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
    entries = [
        int(np.array(e, dtype=np.int64).astype(dtype)) if isinstance(e, int) else e
        for e in source.entries
    ]
    return _Partial(entries, source.scalar, dtype)


def _identity(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    return partial(node.inputs[0])


def _slice(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    data = partial(node.inputs[0])
    if data is None or data.scalar:
        return None
    steps: list[int] | None
    if opset < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes", [0]), [1]
    else:
        starts, ends = int_list(node.inputs[1]), int_list(node.inputs[2])
        axes_input, steps_input = optional_input(node, 3), optional_input(node, 4)
        axes = int_list(axes_input) if axes_input is not None else [0]
        steps = int_list(steps_input) if steps_input is not None else [1]
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if (
        len(starts) != 1
        or len(ends) != 1
        or list(axes) not in ([0], [-1])
        or len(steps) != 1
        or steps[0] == 0
    ):
        return None
    return _Partial(
        data.entries[slice(int(starts[0]), int(ends[0]), int(steps[0]))], False, data.dtype
    )


def _gather(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    data = partial(node.inputs[0])
    indices = partial(node.inputs[1])
    if data is None or indices is None or data.scalar or not indices.known():
        return None
    if int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    n = len(data.entries)
    picked = []
    for index in indices.entries:
        if not -n <= index < n:
            return None
        picked.append(data.entries[index])
    return _Partial(picked, indices.scalar, data.dtype)


def _concat(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    if int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    parts = [partial(t) for t in node.inputs]
    if not parts or any(p is None or p.scalar for p in parts):
        return None
    return _Partial([e for p in parts for e in p.entries], False, parts[0].dtype)


def _unsqueeze(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    source = partial(node.inputs[0])
    present, axes = input_or_attr(node, opset, 1, "axes", input_since=13)
    if source is None or not source.scalar or axes not in ([0], [-1]):
        return None
    return _Partial(source.entries, False, source.dtype)


def _squeeze(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    source = partial(node.inputs[0])
    present, axes = input_or_attr(node, opset, 1, "axes", input_since=13)
    if source is None or source.scalar or len(source.entries) != 1:
        return None
    if present and axes not in ([0], [-1]):
        return None
    return _Partial(source.entries, True, source.dtype)


def _reshape(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    source = partial(node.inputs[0])
    target = int_list(node.inputs[1]) if len(node.inputs) > 1 else None
    if source is None or target is None:
        return None
    if target == []:
        return _Partial(source.entries, True, source.dtype) if len(source.entries) == 1 else None
    if target in ([-1], [len(source.entries)]):
        return _Partial(source.entries, False, source.dtype)
    return None


def _trunc_div(a: int, b: int) -> int:
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b > 0) else -quotient


_ARITHMETIC: dict[str, Callable[[int, int], int]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": _trunc_div,  # ONNX Runtime's integer Div truncates toward zero
    "Max": max,
    "Min": min,
}


def _arithmetic(node: gs.Node, partial: Callable, opset: int) -> _Partial | None:
    if len(node.inputs) != 2:
        return None
    a, b = partial(node.inputs[0]), partial(node.inputs[1])
    if a is None or b is None or a.dtype != b.dtype:
        return None
    n = max(len(a.entries), len(b.entries))
    if len(a.entries) not in (1, n) or len(b.entries) not in (1, n):
        return None
    fn = _ARITHMETIC[node.op]
    entries: list[_Entry] = []
    for i in range(n):
        x = a.entries[i if len(a.entries) > 1 else 0]
        y = b.entries[i if len(b.entries) > 1 else 0]
        if isinstance(x, int) and isinstance(y, int):
            if node.op == "Div" and y == 0:
                return None
            entries.append(int(np.array(fn(x, y), dtype=np.int64).astype(a.dtype)))
        else:
            entries.append(None)
    return _Partial(entries, a.scalar and b.scalar, a.dtype)


_EVALUATORS: dict[str, Callable] = {
    "Shape": _shape,
    "Size": _size,
    "Cast": _cast,
    "Identity": _identity,
    "Slice": _slice,
    "Gather": _gather,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    **dict.fromkeys(_ARITHMETIC, _arithmetic),
}


# ---------------------------------------------------------------------------------------------
# Case 3: everything else, through onnx-graphsurgeon / ONNX Runtime


@dataclass
class _Budget:
    """Bytes that folded outputs may still add beyond the per-node allowance (case 3).

    Each node is charged once, by its first output's name: gs asks about copies of the nodes,
    and may ask again when it retries by partitions.
    """

    spare: float
    charged: dict[str, bool] = field(default_factory=dict)

    def allows(self, node: gs.Node, growth: float) -> bool:
        key = node.outputs[0].name if node.outputs else node.name
        if key not in self.charged:
            self.charged[key] = growth <= self.spare
            if self.charged[key]:
                self.spare -= growth
        return self.charged[key]


def _constant_bytes(graph: gs.Graph) -> int:
    """Bytes of the graph's own constants, from their shapes (lazy values are not loaded)."""
    return sum(_nbytes(t) or 0 for t in graph.tensors().values() if isinstance(t, gs.Constant))


def _fold_with_gs(
    graph: gs.Graph, ir_version: int | None, budget: _Budget
) -> list[tuple[gs.Graph, gs.Tensor]]:
    """Case 3 on one graph; returns the node outputs that became constants."""
    readers = {name: len(t.outputs) for name, t in graph.tensors().items()}

    def excluded(node: gs.Node) -> bool:
        return _excluded(node, readers, budget)

    if not any(_all_inputs_constant(node) and not excluded(node) for node in graph.nodes):
        return []
    watched = [t for node in graph.nodes if node.op != "Constant" for t in node.outputs]
    pack_subbyte_constants(graph)  # gs exports the graph to run it
    # A subgraph carries no IR version of its own; gs would export it with onnx's newest,
    # which ONNX Runtime may not read yet.
    own_ir_version = graph.ir_version
    graph.ir_version = own_ir_version or ir_version
    options = dict(
        fold_shapes=False,
        recurse_subgraphs=False,
        flatten_subgraphs=False,
        should_exclude_node=excluded,
        recurse_functions=False,
    )
    with G_LOGGER.suppress(G_LOGGER.CRITICAL):
        try:
            graph.fold_constants(partitioning=None, error_ok=False, **options)
        except Exception as exc:  # one node ORT cannot run: fold around it
            logger.debug(
                "constant folding of %s failed (%s); retrying by partitions", graph.name, exc
            )
            graph.fold_constants(partitioning="recursive", error_ok=True, **options)
        finally:
            graph.ir_version = own_ir_version
    return [(graph, t) for t in watched if isinstance(t, gs.Constant)]


def _all_inputs_constant(node: gs.Node) -> bool:
    inputs = [t for t in node.inputs if not t.is_empty()]
    return bool(inputs) and all(const_value(t) is not None for t in inputs)


def _excluded(node: gs.Node, readers: dict[str, int], budget: _Budget) -> bool:
    """gs's should_exclude_node: never-fold ops, subgraphs, and the size guard.

    `readers` counts the readers of each tensor in the real graph (gs calls this on a copy,
    where readers in other graphs are missing).
    """
    if node.op in _NEVER_FOLD or not is_default_domain(node) or has_subgraphs(node):
        return True
    # the cost first: _grows charges the growth budget for what it lets through
    return _too_costly(node) or _grows(node, readers, budget)


def _too_costly(node: gs.Node) -> bool:
    """True when a Conv/ConvTranspose/MatMul/Gemm needs more than `_MAX_FOLD_MACS`
    multiply-adds, or its shapes are unknown (case 3)."""
    if node.op not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    shapes = [t.shape for t in (*node.inputs[:2], node.outputs[0])]
    if not all(s is not None and all(is_static_dim(d) for d in s) for s in shapes):
        return True
    data, weight, out = ([int(d) for d in s] for s in shapes)
    if node.op == "Conv":  # every output element reads C/group * kernel weights
        macs = math.prod(out) * math.prod(weight[1:])
    elif node.op == "ConvTranspose":  # every input element is spread over a kernel
        macs = math.prod(data) * math.prod(weight[1:])
    elif node.op == "Gemm":
        inner = data[0] if int(node.attrs.get("transA", 0)) else data[-1]
        macs = math.prod(out) * inner
    else:
        macs = math.prod(out) * (data[-1] if data else 1)
    return macs > _MAX_FOLD_MACS


def _grows(node: gs.Node, readers: dict[str, int], budget: _Budget) -> bool:
    """True when the node's output may exceed what it frees by more than the allowance
    and the budget's spare bytes.

    An input read by k nodes is credited with 1/k of its size: it only disappears when all
    its readers are folded (two Slices of one weight fold; one Transpose of a weight that is
    also read elsewhere, say in the other branch of an If, would store it twice).
    """
    inputs = {id(t): t for t in node.inputs if not t.is_empty()}
    in_bytes = 0.0
    for tensor in inputs.values():
        size = _nbytes(tensor)
        if size is None:
            return True
        in_bytes += size / max(1, readers.get(tensor.name, 1))
    out_sizes = [_nbytes(t) for t in node.outputs if not t.is_empty()]
    known_sizes = [size for size in out_sizes if size is not None]
    if len(known_sizes) < len(out_sizes):
        predicted = _predicted_nbytes(node)
        if predicted is None and node.op in _NEVER_GROW:
            predicted = max((_nbytes(t) or 0 for t in inputs.values()), default=0)
        if predicted is None:
            return True
        out_bytes = predicted
    else:
        out_bytes = sum(known_sizes)
    excess = out_bytes - in_bytes - _GROWTH_ALLOWANCE
    return excess > 0 and not budget.allows(node, excess)


def _itemsize(dtype) -> int | None:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype))).itemsize
        except Exception:
            return None


def _nbytes(tensor: gs.Tensor) -> int | None:
    """Size in bytes of a constant, or from a static inferred shape; None if unknown."""
    if not isinstance(tensor, gs.Constant):
        value = const_value(tensor)  # a Constant node's output
        if value is not None:
            return int(value.nbytes)
    shape = tensor.shape
    if shape is None or tensor.dtype is None:
        return None
    if not all(is_static_dim(d) for d in shape):
        return None
    itemsize = _itemsize(tensor.dtype)
    return None if itemsize is None else math.prod(int(d) for d in shape) * itemsize


def _predicted_nbytes(node: gs.Node) -> int | None:
    """Output size of the ops that create data, from their constant inputs."""
    values = [const_value(t) if not t.is_empty() else None for t in node.inputs]
    try:
        if node.op == "ConstantOfShape" and values[0] is not None:
            fill = node.attrs.get("value")
            itemsize = fill.values.itemsize if isinstance(fill, gs.Constant) else 4
            return math.prod(int(v) for v in values[0].reshape(-1)) * itemsize
        if node.op == "Expand" and values[0] is not None and values[1] is not None:
            shape = np.broadcast_shapes(
                values[0].shape, tuple(int(v) for v in values[1].reshape(-1))
            )
            return math.prod(shape) * values[0].itemsize
        if node.op == "Tile" and values[0] is not None and values[1] is not None:
            return values[0].nbytes * math.prod(int(v) for v in values[1].reshape(-1))
        range_args = [v for v in values[:3] if v is not None]
        if node.op == "Range" and len(range_args) == 3:
            start, limit, delta = (float(v.reshape(-1)[0]) for v in range_args)
            return max(math.ceil((limit - start) / delta), 0) * range_args[0].itemsize
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Case 4: If nodes with a constant condition


def _inline_constant_ifs(root: gs.Graph, graph: gs.Graph | None = None) -> int:
    """Case 4 on `graph` (default `root`) and the subgraphs it keeps; returns the Ifs inlined."""
    graph = root if graph is None else graph
    inlined = 0
    index = 0
    while index < len(graph.nodes):
        node = graph.nodes[index]
        branch = _taken_branch(node)
        if branch is not None:
            _rename_clashing_locals(root, branch)
            _inline_branch(graph, index, node, branch)
            inlined += 1
            continue  # the branch's own nodes now start at `index`: nested Ifs come next
        for sub in subgraphs_of(node):
            inlined += _inline_constant_ifs(root, sub)
        index += 1
    return inlined


def _taken_branch(node: gs.Node) -> gs.Graph | None:
    """The branch an If with a constant condition takes; None for any other node."""
    if node.op != "If" or not is_default_domain(node) or not node.inputs:
        return None
    condition = const_value(node.inputs[0])
    if condition is None or condition.size != 1:
        return None
    branch = node.attrs.get("then_branch" if bool(condition.reshape(-1)[0]) else "else_branch")
    if (
        not isinstance(branch, gs.Graph)
        or branch.inputs
        or len(branch.outputs) != len(node.outputs)
    ):
        return None
    return branch


def _rename_clashing_locals(root: gs.Graph, branch: gs.Graph) -> None:
    """Rename the branch's own tensors whose names other tensors of the model also have."""
    inside = {id(g) for g in all_graphs(branch)}
    used: dict[str, set[int]] = {}
    for g in all_graphs(root):
        if id(g) not in inside:
            for name, tensor in g.tensors().items():
                used.setdefault(name, set()).add(id(tensor))
    own = branch.tensors()
    taken = set(used) | set(own)
    for name, tensor in own.items():
        if name and name in used and id(tensor) not in used[name]:
            fresh, i = f"{name}_inlined", 1
            while fresh in taken:
                fresh, i = f"{name}_inlined_{i}", i + 1
            tensor.name = fresh
            taken.add(fresh)


def _inline_branch(graph: gs.Graph, index: int, node: gs.Node, branch: gs.Graph) -> None:
    """Replace the If `node` (at `index` of `graph`) by the nodes of `branch`."""
    outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    del graph.nodes[index]
    moved = list(branch.nodes)
    graph.nodes[index:index] = moved
    forget_names(graph)
    produced = {id(t) for n in moved for t in n.outputs}
    written: dict[int, gs.Tensor] = {}  # branch output -> the If output its producer now writes
    for out, value in zip(outputs, branch.outputs, strict=True):
        if id(value) in produced and id(value) not in written:
            redirect_readers(value, out)
            producer = producer_of(value)
            assert producer is not None  # in `produced`
            producer.outputs[next(i for i, t in enumerate(producer.outputs) if t is value)] = out
            if out.dtype is None:
                out.dtype, out.shape = value.dtype, value.shape
            written[id(value)] = out
        else:  # an outer tensor, a constant, or a value given to two outputs
            source = written.get(id(value), value)
            name = unique_name(graph, f"{out.name}_inlined")
            graph.nodes.insert(
                index, gs.Node("Identity", name=name, inputs=[source], outputs=[out])
            )


# ---------------------------------------------------------------------------------------------
# Case 5: Range bounds


def _scalar_range_bounds(graphs: list[gs.Graph]) -> int:
    """Case 5: constant one-element Range bounds of rank 1 become scalars; returns how many."""
    changes = 0
    for graph in graphs:
        for node in graph.nodes:
            if node.op != "Range" or not is_default_domain(node):
                continue
            for i, bound in enumerate(node.inputs[:3]):
                value = const_value(bound)
                if value is None or value.ndim == 0 or value.size != 1:
                    continue
                node.inputs[i] = make_constant(graph, f"{bound.name}_scalar", value.reshape(()))
                changes += 1
    return changes


# ---------------------------------------------------------------------------------------------
# Graph outputs and Constant nodes


def _restore_constant_nodes(constant_nodes: list[tuple[gs.Node, gs.Tensor]]) -> None:
    """Give back to Constant nodes the outputs gs lowered; constants_to_initializers decides."""
    for node, tensor in constant_nodes:
        if isinstance(tensor, gs.Constant) and not tensor.inputs and not node.outputs:
            tensor.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))
            tensor.type = "tensor_type"  # to_variable leaves it unset, and export reads it
            node.outputs.append(tensor)


def _produce_by_constant_node(graph: gs.Graph, tensor: gs.Constant) -> None:
    """Turn a folded constant back into a Variable written by a new Constant node in `graph`.

    Used for graph outputs (an initializer cannot portably be one) and for large values read
    from several graphs (an initializer would be copied into each of them).
    """
    values = np.asarray(tensor.values)
    tensor.to_variable(dtype=values.dtype, shape=list(values.shape))
    tensor.type = "tensor_type"  # to_variable leaves it unset, and export reads it
    name = unique_name(graph, f"{tensor.name}_constant")
    value = gs.Constant(f"{name}_value", values)
    graph.nodes.append(gs.Node("Constant", name=name, attrs={"value": value}, outputs=[tensor]))
