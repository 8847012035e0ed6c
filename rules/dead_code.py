"""Dead-code removal: Constant nodes become initializers; unreachable nodes and outputs go.

Two passes, both exact (the model computes the same values, bit for bit):

`constants_to_initializers`
    A `Constant` node `y = Constant<value=V>()` is replaced by the initializer `y = V`: readers
    see the same tensor, one node fewer, and every later rule sees weights as `gs.Constant`.

    1. `value`, `value_float(s)` and `value_int(s)` are converted (float -> float32,
       int -> int64, as the ONNX spec defines them); `value_string(s)`, `sparse_value` and
       attribute references (inside functions) are left alone.
    2. A Constant whose output is an output of its graph keeps its node: an initializer that
       is also a graph output is not portable across runtimes.
    3. A large constant read by nodes of several graphs (outer graph and If/Loop bodies) keeps
       its node, so that its bytes are not copied into each graph (`may_share`, case 5 of
       `onnxshrink.engine.patterns`).
    4. Subgraphs are visited too (every Constant of every If/Loop/Scan body).

`remove_dead_code`
    5. Nodes with no path to a graph output, and initializers nobody reads, are dropped
       (onnx-graphsurgeon's `cleanup()`, over subgraphs too; graph inputs are kept).
    6. Unused outputs that the operator schema marks optional (Dropout's mask, MaxPool's
       Indices, BatchNormalization's running statistics, LSTM's Y_h...) are dropped: trailing
       ones are removed, inner ones become the empty name `""`. Required and variadic outputs
       (Split, If, Loop) are never touched: their count is part of the node's meaning.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxshrink.engine.graph import all_graphs, is_default_domain, is_graph_output, node_owners
from onnxshrink.engine.passes import RuleContext
from onnxshrink.engine.patterns import may_share

logger = logging.getLogger(__name__)

_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def constants_to_initializers(graph: gs.Graph, ctx: RuleContext) -> bool:
    """Turn every convertible `Constant` node (in all subgraphs too) into an initializer.

    Returns True when at least one node was converted.
    """
    modified = False
    graphs = list(all_graphs(graph))
    owners = node_owners(graphs)
    for sub in graphs:
        for node in list(sub.nodes):
            if node.op != "Constant" or not is_default_domain(node) or len(node.outputs) != 1:
                continue
            values = constant_node_value(node)
            if values is None:  # case 1: strings, sparse values, attribute references
                continue
            out = node.outputs[0]
            if is_graph_output(sub, out):  # case 2
                continue
            if not may_share(out, values.nbytes, owners):  # case 3
                continue
            out.to_constant(values)
            out.inputs.clear()  # also removes `out` from the Constant node's outputs
            modified = True
    return modified


def constant_node_value(node: gs.Node) -> np.ndarray | LazyValues | None:
    """The value a `Constant` node produces, or None when it is not a plain tensor (case 1)."""
    if len(node.attrs) != 1:
        return None
    name, value = next(iter(node.attrs.items()))
    if name not in _CONSTANT_ATTRS or isinstance(value, gs.Node.AttributeRef):
        return None
    if name == "value":
        if not isinstance(value, gs.Constant):
            return None
        return value._values  # LazyValues stay lazy: no copy of large tensors
    if name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    return np.asarray(value, dtype=np.int64)


def remove_dead_code(graph: gs.Graph, ctx: RuleContext) -> bool:
    """Drop unreachable nodes, unused initializers and unused optional outputs (cases 5, 6).

    Returns True only when a node, tensor or output was actually removed.
    """
    trimmed = sum(_trim_optional_outputs(sub, ctx.opset) for sub in list(all_graphs(graph)))
    before = _count(graph)
    graph.cleanup(remove_unused_graph_inputs=False)
    after = _count(graph)
    if trimmed or after != before:
        logger.debug(
            "dead code: %s -> %s (nodes, tensors), %d outputs trimmed", before, after, trimmed
        )
        return True
    return False


def _count(graph: gs.Graph) -> tuple[int, int]:
    nodes = 0
    tensors = 0
    for sub in all_graphs(graph):
        nodes += len(sub.nodes)
        tensors += len(sub.tensors())
    return nodes, tensors


def _trim_optional_outputs(graph: gs.Graph, opset: int) -> int:
    """Case 6: remove unused optional outputs; returns how many were removed."""
    removed = 0
    for node in graph.nodes:
        if not is_default_domain(node) or len(node.outputs) < 2:
            continue
        optional = _optional_outputs(node.op, opset)
        if not optional:
            continue
        unused = [
            i
            for i, out in enumerate(node.outputs)
            if i in optional
            and not out.is_empty()
            and not out.outputs
            and not is_graph_output(graph, out)
        ]
        if not unused:
            continue
        for i in unused:
            node.outputs[i] = gs.Variable.empty()
            removed += 1
        while node.outputs and node.outputs[-1].is_empty():
            node.outputs.pop()
    return removed


_SCHEMA_CACHE: dict[tuple[str, int], frozenset[int]] = {}


def _optional_outputs(op: str, opset: int) -> frozenset[int]:
    """Indices of the outputs that `op`'s schema (at `opset`) marks optional."""
    key = (op, opset)
    if key not in _SCHEMA_CACHE:
        try:
            schema = onnx.defs.get_schema(op, opset, "")
        except onnx.defs.SchemaError:
            _SCHEMA_CACHE[key] = frozenset()
        else:
            optional = onnx.defs.OpSchema.FormalParameterOption.Optional
            _SCHEMA_CACHE[key] = frozenset(
                i for i, param in enumerate(schema.outputs) if param.option == optional
            )
    return _SCHEMA_CACHE[key]
