"""Small helpers over onnx-graphsurgeon graphs that rules share.

Rules rewire by pointing consumers at new tensors (`replace_all_uses`), then detach what they
replaced (`detach`); the pass manager's `cleanup()` drops dead nodes and `toposort()` restores
order. Graph inputs and outputs keep their names: when a rewrite replaces a graph output tensor,
`replace_all_uses` renames so that the output name survives.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs


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


def is_const(tensor: gs.Tensor | None) -> bool:
    """True when the tensor's value is known at rewrite time."""
    return const_value(tensor) is not None


def producer_of(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers_of(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read `tensor` (subgraph readers of an outer tensor included by gs)."""
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """True when `tensor` is one of `graph`'s outputs."""
    return any(out is tensor for out in graph.outputs)


def only_consumer(graph: gs.Graph, tensor: gs.Tensor, node: gs.Node) -> bool:
    """True when `node` is the sole reader of `tensor` and `tensor` is not a graph output."""
    readers = tensor.outputs
    return len(readers) == 1 and readers[0] is node and not is_graph_output(graph, tensor)


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every reader of `old` at `new`; a graph output keeps its name and position.

    Readers inside subgraphs are included: gs shares outer tensors with the nodes of If/Loop
    bodies that capture them, so they appear in `old.outputs`.

    When `old` is a graph output and `new` is produced by a node of this graph, the producer
    writes `old` directly instead (so the output name survives). Otherwise an Identity keeps
    the output name, which is still correct, and is rare (an output that became a constant or
    an input).
    """
    for reader in list(old.outputs):
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new
    if not is_graph_output(graph, old):
        return
    new_producer = producer_of(new)
    if (
        new_producer is not None
        and any(n is new_producer for n in graph.nodes)  # not an outer-scope producer
        and not is_graph_output(graph, new)
        and not new.outputs
        and not isinstance(new, gs.Constant)
    ):
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


def subgraphs_of(node: gs.Node) -> Iterator[gs.Graph]:
    """The subgraphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, gs.Graph):
                    yield item


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """`graph` and every subgraph nested in it, outermost first."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs_of(node):
            yield from all_graphs(sub)


def make_constant(graph: gs.Graph, name_hint: str, values: np.ndarray) -> gs.Constant:
    """A new initializer tensor with a name unique in `graph`."""
    return gs.Constant(unique_name(graph, name_hint), np.ascontiguousarray(values))


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
