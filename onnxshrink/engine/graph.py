"""Small helpers over onnx-graphsurgeon graphs that rules share.

Rules rewire by pointing consumers at new tensors (`replace_all_uses`), then detach what they
replaced (`detach`); the pass manager's `cleanup()` drops dead nodes and `toposort()` restores
order. Graph inputs and outputs keep their names: when a rewrite replaces a graph output tensor,
`replace_all_uses` renames so that the output name survives.

Besides editing, the module answers the questions every rule family asks: which op a node is
(`is_op`, `is_default_domain`), which graph scope it belongs to (`in_graph`,
`outer_scope_source`), who reads a tensor (`readers`, `sole_reader`, `only_consumer`), what its
dims and dtype are (`tensor_dims`, `known_shape`, `onnx_dtype`, `tensor_dtype`), and what a
constant operand holds (`const_value`, `scalar_constant`, `int_list`, `input_or_attr`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

#: the ai.onnx domain as nodes spell it (gs imports the default domain as None)
DEFAULT_DOMAINS = (None, "", "ai.onnx")

#: ops whose outputs may differ between two runs on the same inputs (Dropout: its mask in
#: training mode); rules neither merge two of them nor evaluate them at rewrite time
NONDETERMINISTIC_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


# ---------------------------------------------------------------------------------------------
# Nodes: op and domain, graph scopes, operands
# ---------------------------------------------------------------------------------------------


#: element types stored packed, several to a byte
_PACKED_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2")
    if hasattr(onnx.TensorProto, name)
)


def pack_subbyte_constants(graph: gs.Graph) -> None:
    """Give every int4/uint4/float4 (and 2-, 6-bit) constant whose values were read back into
    numpy a packed TensorProto to export from, in `graph` and its subgraphs.

    gs exports such values with `ndarray.tobytes()`, one byte per element, which onnx's
    make_tensor refuses: every int4 model failed once a rule had looked at its weights.
    onnx's `numpy_helper.from_array` packs them as the format says. Call it before any export.
    """
    for sub in all_graphs(graph):
        constants = [t for t in sub.tensors().values() if isinstance(t, gs.Constant)]
        constants += [
            v for node in sub.nodes for v in node.attrs.values() if isinstance(v, gs.Constant)
        ]
        for tensor in constants:
            if isinstance(tensor._values, LazyValues):
                continue  # exported from its own TensorProto
            values = np.asarray(tensor.values)
            try:
                onnx_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            except (KeyError, ValueError, TypeError):
                continue
            if onnx_type in _PACKED_TYPES:
                tensor._values = LazyValues(onnx.numpy_helper.from_array(values, tensor.name))


def is_default_domain(node: gs.Node) -> bool:
    """True for ai.onnx ops (domain None, "" or "ai.onnx")."""
    return node.domain in DEFAULT_DOMAINS


def is_op(node: gs.Node | None, *ops: str) -> TypeGuard[gs.Node]:
    """True when `node` is not None and is one of the ai.onnx ops named in `ops`.

    A type guard: where it returns True, the type checker knows `node` is not None.
    """
    return node is not None and node.op in ops and is_default_domain(node)


def subgraphs_of(node: gs.Node) -> Iterator[gs.Graph]:
    """The subgraphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, gs.Graph):
                    yield item


def has_subgraphs(node: gs.Node) -> bool:
    """True when the node holds a graph in an attribute (If, Loop, Scan)."""
    return next(subgraphs_of(node), None) is not None


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """`graph` and every subgraph nested in it, outermost first."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs_of(node):
            yield from all_graphs(sub)


def node_owners(graphs: Sequence[gs.Graph]) -> dict[int, int]:
    """Map id(node) -> index of the graph (in `graphs`) that holds the node."""
    return {id(node): index for index, g in enumerate(graphs) for node in g.nodes}


def in_graph(graph: gs.Graph, node: gs.Node, *, exact: bool = False) -> bool:
    """True when `node` is one of `graph`'s own nodes, not a node of an outer or inner scope.

    gs shares tensors across scopes, so a tensor's producer or readers may live in another
    graph; rules must not fold across that boundary.

    By default the node-id set is cached on the graph and rebuilt when the node count changes,
    so that asking about every node of a large graph costs one scan. Rules only append nodes
    within a sweep; a stale cache can only miss a new node, which makes a fold rule decline,
    never fold wrongly. `exact=True` scans `graph.nodes` instead, for the rare paths that must
    see the graph as it is now (`outer_scope_source`, `can_become_output`).
    """
    if exact:
        return any(n is node for n in graph.nodes)
    # vars(): gs.Graph.__getattr__ logs an error for unknown names.
    cache = vars(graph).get("_onnxshrink_node_ids")
    if cache is None or cache[0] != len(graph.nodes):
        nodes = tuple(graph.nodes)  # kept alive so that ids are not reused
        cache = (len(nodes), {id(n) for n in nodes}, nodes)
        graph._onnxshrink_node_ids = cache
    return id(node) in cache[1]


def outer_scope_source(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """True when `tensor` is produced by a node of an enclosing graph, not of `graph`.

    Bypassing a node whose output is `graph`'s output with such a source is not supported by
    `replace_all_uses` (it would make the outer producer write the body's output).
    """
    producer = producer_of(tensor)
    return producer is not None and not in_graph(graph, producer, exact=True)


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's input at `index`, or None when absent or given as the empty name."""
    if index < len(node.inputs) and node.inputs[index].name != "":
        return node.inputs[index]
    return None


def input_or_attr(
    node: gs.Node, opset: int, index: int, attr: str, input_since: int
) -> tuple[bool, list[int] | None]:
    """An int-list operand that moved from an attribute to an input at opset `input_since`.

    Returns (present, values): present is False when neither is given (the operand's default
    applies); values is None when it is given but not constant.
    """
    if opset >= input_since:
        tensor = optional_input(node, index)
        if tensor is None:
            return False, None
        return True, int_list(tensor)
    if attr not in node.attrs:
        return False, None
    value = node.attrs[attr]
    return True, [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


# ---------------------------------------------------------------------------------------------
# Tensors: producer and readers, constant values, dims, dtypes
# ---------------------------------------------------------------------------------------------


def producer_of(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def readers(tensor: gs.Tensor) -> list[gs.Node]:
    """The distinct nodes reading `tensor` (gs lists a node once per input slot it fills)."""
    seen: dict[int, gs.Node] = {}
    for node in tensor.outputs:
        seen.setdefault(id(node), node)
    return list(seen.values())


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """True when `tensor` is one of `graph`'s outputs."""
    return any(out is tensor for out in graph.outputs)


def only_consumer(graph: gs.Graph, tensor: gs.Tensor, node: gs.Node) -> bool:
    """True when `node` is the sole reader of `tensor` and `tensor` is not a graph output.

    Input slots are counted, not nodes: for `Mul(t, t)` this is False (see `sole_reader`).
    """
    consumers = tensor.outputs
    return len(consumers) == 1 and consumers[0] is node and not is_graph_output(graph, tensor)


def sole_reader(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading `tensor` when `tensor` is not a graph output, else None.

    Nodes are counted, not input slots: `Mul(t, t)` is the sole reader of t (see
    `only_consumer`).
    """
    found = readers(tensor)
    if len(found) != 1 or is_graph_output(graph, tensor):
        return None
    return found[0]


def can_become_output(
    graph: gs.Graph, tensor: gs.Tensor, *, ignoring: gs.Node | None = None
) -> bool:
    """True when `tensor`'s producer can write a graph output tensor in its place.

    `tensor` must be written by a node of `graph` itself (exact scope check), be neither a
    constant nor a graph output, and have no readers besides `ignoring` (a node about to go);
    otherwise keeping a graph output's name takes an Identity.
    """
    if isinstance(tensor, gs.Constant) or is_graph_output(graph, tensor):
        return False
    producer = producer_of(tensor)
    if producer is None or not in_graph(graph, producer, exact=True):
        return False
    return all(reader is ignoring for reader in tensor.outputs)


@dataclass(frozen=True)
class ConstSpec:
    """The dtype and shape of a constant, known without reading its values."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def const_spec(tensor: gs.Tensor | None) -> ConstSpec | None:
    """dtype and shape of a constant tensor (as `const_value` finds it), without loading it:
    a lazily imported initializer stays on disk or in the model until a rewrite needs it."""
    if tensor is None:
        return None
    constant: gs.Constant | None = tensor if isinstance(tensor, gs.Constant) else None
    if constant is None:
        producer = producer_of(tensor)
        if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
            value = producer.attrs["value"]
            constant = value if isinstance(value, gs.Constant) else None
    if constant is None:
        return None
    values = constant._values  # LazyValues and arrays both know dtype and shape
    try:
        dtype = np.dtype(values.dtype)
    except TypeError:  # an ONNX type numpy lacks (gs gives its onnx enum): no float rewrite
        dtype = np.dtype(np.void)
    return ConstSpec(dtype, tuple(int(d) for d in values.shape))


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return tensor.values
    producer = producer_of(tensor)
    if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
        value = producer.attrs["value"]
        if isinstance(value, gs.Constant):
            return value.values
    return None


def scalar_constant(tensor: gs.Tensor | None) -> tuple[float, int] | None:
    """(value, ndim) of a one-element floating-point constant, else None.

    The ndim tells whether dropping the constant could change a result's rank (a shape-[1]
    constant lifts a rank-0 tensor to rank 1).
    """
    value = const_value(tensor)
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0]), value.ndim


def int_list(tensor: gs.Tensor | None) -> list[int] | None:
    """The values of a constant integer tensor of rank <= 1 as a list, else None."""
    value = const_value(tensor)
    if value is None or value.ndim > 1 or not np.issubdtype(value.dtype, np.integer):
        return None
    return [int(v) for v in np.asarray(value).reshape(-1)]


def is_static_dim(dim: object) -> bool:
    """True for a known dim: a non-negative int (not a symbolic name, None or a bool)."""
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and bool(dim >= 0)


def tensor_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """The dims of a tensor: an int where static, None where symbolic; None when rank unknown.

    Read from `tensor.shape` (a gs.Constant's own shape), so a Constant node's output has the
    dims that shape inference gave it; `known_shape` reads constant values instead.
    """
    if isinstance(tensor, gs.Constant):
        return list(tensor.shape)
    shape = tensor.shape
    if shape is None:
        return None
    return [d if is_static_dim(d) else None for d in shape]


def known_shape(tensor: gs.Tensor) -> list | None:
    """The shape of a tensor as far as it is known; None when its rank is unknown.

    A constant's (initializer or Constant-node output) is its value's shape; any other
    tensor's is `tensor.shape` as it stands: ints, symbolic dim names or None. Unlike
    `tensor_dims`, symbolic dims are not normalized to None.
    """
    value = const_value(tensor)
    if value is not None:
        return list(np.shape(value))
    return list(tensor.shape) if tensor.shape is not None else None


def onnx_dtype(tensor: gs.Tensor) -> int | None:
    """The ONNX element type (a TensorProto enum) of the tensor's dtype, or None when unknown.

    Read from `tensor.dtype` alone; `tensor_dtype` also reads constant values.
    """
    if tensor.dtype is None:
        return None
    try:
        return int(dtype_to_onnx(tensor.dtype))
    except Exception:
        return None


def tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The numpy dtype of a tensor, or None when unknown or not a numpy type.

    A constant's (Constant-node outputs too) comes from its value, any other from
    `tensor.dtype`.
    """
    value = const_value(tensor)
    if value is not None:
        return np.asarray(value).dtype
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None


def first_dtype(*tensors: gs.Tensor) -> np.dtype | None:
    """The `tensor_dtype` of the first of `tensors` that has a known one, else None."""
    # np.dtype is falsy (it has no fields), so no `or` chains here.
    for tensor in tensors:
        dtype = tensor_dtype(tensor)
        if dtype is not None:
            return dtype
    return None


# ---------------------------------------------------------------------------------------------
# Editing
# ---------------------------------------------------------------------------------------------


def redirect_readers(old: gs.Tensor, new: gs.Tensor) -> int:
    """Point every input slot that reads `old` (subgraph readers included) at `new`.

    Returns the number of slots rewired. Graph outputs are left as they are; use
    `replace_all_uses` where `old` may be one.
    """
    rewired = 0
    for reader in list(old.outputs):
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new
                rewired += 1
    return rewired


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every reader of `old` at `new`; a graph output keeps its name and position.

    Readers inside subgraphs are included: gs shares outer tensors with the nodes of If/Loop
    bodies that capture them, so they appear in `old.outputs`.

    When `old` is a graph output and `new` is produced by a node of this graph, the producer
    writes `old` directly instead (so the output name survives). Otherwise an Identity keeps
    the output name, which is still correct, and is rare (an output that became a constant or
    an input).
    """
    redirect_readers(old, new)
    if not is_graph_output(graph, old):
        return
    if can_become_output(graph, new):
        new_producer = producer_of(new)
        assert new_producer is not None  # can_become_output found it
        old_producer = producer_of(old)
        if old_producer is not None:
            old_producer.outputs = [t for t in old_producer.outputs if t is not old]
        for i, t in enumerate(new_producer.outputs):
            if t is new:
                new_producer.outputs[i] = old
        if old.dtype is None:
            old.dtype = new.dtype
        return
    old_producer = producer_of(old)
    if old_producer is not None:
        old_producer.outputs = [t for t in old_producer.outputs if t is not old]
    graph.nodes.append(
        gs.Node("Identity", name=f"{old.name}_keep_output", inputs=[new], outputs=[old])
    )


def detach(node: gs.Node) -> None:
    """Disconnect `node` so that cleanup() removes it; the pass manager skips detached nodes."""
    node.inputs.clear()
    node.outputs.clear()


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """Make `tensor` the node's input at `index`; skipped optional inputs get the empty name."""
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(tensor)


def make_constant(graph: gs.Graph, name_hint: str, values: np.ndarray) -> gs.Constant:
    """A new initializer tensor with a name unique in `graph`; a scalar stays a scalar."""
    values = np.asarray(values)
    # np.ascontiguousarray alone returns at least one dim: a scalar would become shape [1]
    return gs.Constant(
        unique_name(graph, name_hint), np.ascontiguousarray(values).reshape(values.shape)
    )


def make_variable(graph: gs.Graph, name_hint: str, like: gs.Tensor | None = None) -> gs.Variable:
    """A new intermediate tensor with a unique name; dtype and shape copied from `like`."""
    return gs.Variable(
        unique_name(graph, name_hint),
        dtype=like.dtype if like is not None else None,
        shape=like.shape if like is not None else None,
    )


def unique_name(graph: gs.Graph, hint: str) -> str:
    """A tensor/node name not yet used in `graph`."""
    used = _names(graph)
    if hint not in used:
        used.add(hint)
        return hint
    i = 1
    while f"{hint}_{i}" in used:
        i += 1
    name = f"{hint}_{i}"
    used.add(name)
    return name


def _names(graph: gs.Graph) -> set[str]:
    # gs.Graph.__getattr__ treats unknown attributes as ONNX functions and logs; bypass it.
    cache = graph.__dict__.get("_onnxshrink_names")
    if cache is None:
        cache = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        graph._onnxshrink_names = cache
    return cache


def forget_names(graph: gs.Graph) -> None:
    """Drop the unique-name cache (the pass manager calls this after cleanup)."""
    graph.__dict__.pop("_onnxshrink_names", None)
