"""Common-subexpression elimination: identical nodes are computed once.

Two nodes of one graph compute the same values when they have the same op, domain and
attributes and read the same inputs (the same tensor, or constants with equal dtype, shape and
bytes). The later one is removed and its readers read the earlier one's outputs.

1. Nodes are visited in topological order with a key per node; a rewired input makes its
   readers' keys match in turn, so whole duplicated chains collapse in one sweep.
2. Never merged: nodes with subgraph attributes (If, Loop, Scan), nondeterministic ops
   (RandomNormal, RandomUniform and their -Like forms, Multinomial, Bernoulli, and Dropout,
   whose mask is random in training mode), and nodes of non-standard domains (their
   determinism is unknown).
3. Graph outputs: when the duplicate's output is a graph output and the kept node's is not,
   the kept node writes the graph output tensor instead (the name survives, no Identity).
   When both outputs of a pair are graph outputs, both nodes are kept.
4. Each graph is handled on its own (bodies of If/Loop included); nodes are not merged across
   graphs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    NONDETERMINISTIC_OPS,
    all_graphs,
    detach,
    has_subgraphs,
    is_default_domain,
    is_graph_output,
    redirect_readers,
    replace_all_uses,
)
from onnxshrink.engine.passes import RuleContext

logger = logging.getLogger(__name__)

#: constants up to this size are keyed by their bytes, larger ones by a SHA-256 digest
_INLINE_BYTES = 64


def eliminate_common_subexpressions(graph: gs.Graph, ctx: RuleContext) -> bool:
    """Merge identical nodes in `graph` and each of its subgraphs.

    Returns True when at least one node was removed.
    """
    merged = 0
    for sub in list(all_graphs(graph)):
        merged += _eliminate(sub)
    if merged:
        logger.debug("cse: %d nodes merged", merged)
    return merged > 0


def _eliminate(graph: gs.Graph) -> int:
    """Case 1 on one graph. Keys are built in two steps so that weights are only hashed when
    two nodes already agree on everything else (op, attributes, other inputs, shapes)."""
    buckets: dict[Hashable, list[list]] = {}
    fingerprints: dict[int, Hashable] = {}
    merged = 0
    for node in list(graph.nodes):
        if not node.outputs or not _mergeable(node):
            continue
        coarse = _node_key(node, None)
        if coarse is None:
            continue
        bucket = buckets.setdefault(coarse, [])
        fine = _node_key(node, fingerprints) if bucket else None
        kept = None
        for entry in bucket:
            if entry[1] is None:
                entry[1] = _node_key(entry[0], fingerprints)
            if entry[1] == fine:
                kept = entry[0]
                break
        if kept is not None and _merge(graph, kept, node):
            merged += 1
        else:
            bucket.append([node, fine])
    return merged


def _mergeable(node: gs.Node) -> bool:
    """Case 2."""
    return (
        node.op not in NONDETERMINISTIC_OPS and is_default_domain(node) and not has_subgraphs(node)
    )


def _node_key(node: gs.Node, fingerprints: dict[int, Hashable] | None) -> Hashable | None:
    """The node's identity; constants by dtype and shape only when `fingerprints` is None."""
    inputs = tuple(_tensor_key(t, fingerprints) for t in node.inputs)
    attrs = tuple(sorted((name, _attr_key(value)) for name, value in node.attrs.items()))
    if any(value is None for _, value in attrs):
        return None
    return (
        node.op,
        "" if is_default_domain(node) else node.domain,
        attrs,
        inputs,
        len(node.outputs),
    )


def _tensor_key(tensor: gs.Tensor, fingerprints: dict[int, Hashable] | None) -> Hashable:
    if tensor.is_empty():
        return ("empty",)
    if not isinstance(tensor, gs.Constant):
        return ("tensor", id(tensor))
    if fingerprints is None:
        return ("const", str(tensor.dtype), tuple(tensor.shape))
    key = fingerprints.get(id(tensor))
    if key is None:
        key = ("const", *constant_fingerprint(np.asarray(tensor.values)))
        fingerprints[id(tensor)] = key
    return key


def constant_fingerprint(values: np.ndarray) -> tuple:
    """(dtype, shape, bytes or digest): equal for constants with identical contents."""
    data = np.ascontiguousarray(values).tobytes()
    body = data if len(data) <= _INLINE_BYTES else hashlib.sha256(data).digest()
    return (values.dtype.str, tuple(values.shape), len(data), body)


def _attr_key(value: object) -> Hashable | None:
    if isinstance(value, gs.Graph):
        return None
    if isinstance(value, gs.Constant):
        return ("tensor", *constant_fingerprint(np.asarray(value.values)))
    if isinstance(value, gs.Node.AttributeRef):
        return ("ref", value.name)
    if isinstance(value, np.ndarray):
        return ("array", *constant_fingerprint(value))
    if isinstance(value, (list, tuple)):
        items = tuple(_attr_key(v) for v in value)
        return None if any(i is None for i in items) else ("list", items)
    if isinstance(value, float):
        return ("float", repr(value))  # repr keeps -0.0 and nan apart from 0.0
    if isinstance(value, (bool, int, str, bytes, np.generic)):
        return (type(value).__name__, value if not isinstance(value, np.generic) else value.item())
    return None


def _merge(graph: gs.Graph, kept: gs.Node, duplicate: gs.Node) -> bool:
    """Case 3: point readers of `duplicate`'s outputs at `kept`'s; False when both are outputs."""
    pairs = list(zip(kept.outputs, duplicate.outputs, strict=True))
    if any(
        is_graph_output(graph, ours) and is_graph_output(graph, theirs) for ours, theirs in pairs
    ):
        return False
    detach(duplicate)
    for index, (ours, theirs) in enumerate(pairs):
        if theirs.is_empty():
            continue
        if ours.is_empty():
            # The kept node did not produce this optional output; take over the duplicate's.
            kept.outputs[index] = theirs
            continue
        if is_graph_output(graph, theirs):
            # Keep the graph output's tensor: readers of ours move to it, kept writes it.
            redirect_readers(ours, theirs)
            kept.outputs[index] = theirs
            continue
        replace_all_uses(graph, theirs, ours)
    return True
