"""Helpers for rules that edit the ONNX protobuf directly (the lossy stages' rewrites).

The lossless rules work on onnx-graphsurgeon graphs (`onnxshrink.engine.graph`); the lossy
stages (`rules/qdq.py`, `rules/float16.py`, `rules/smooth_matmul.py`,
`rules/quantize_gather.py`) build many candidate models and edit the protobuf in place. What
they share:

1. `--exclude`: `compile_excludes` turns the user's regexes into patterns (UsageError naming a
   bad one), and `excluded_by` says why a node is excluded: a pattern found in its name
   (`re.search`) or matching its op type in full (`re.fullmatch`, so `Conv` keeps every Conv
   and no ConvTranspose).
2. `splice_nodes`: new nodes go right after the node they follow (index -1: first), so the node
   list stays topologically sorted; initializers that nothing reads any more are dropped with
   their value_info, and the new ones appended.
3. `drop_initializers`: initializers are removed where they are, never by clearing the list and
   extending it with the ones kept. protobuf's upb backend copies every message appended to a
   repeated field into the model's arena and frees an arena only whole, so that clear-and-extend
   would leave a second copy of every kept weight in memory for the model's lifetime (issue 9,
   4: a quarter of the int8 stage's peak on a large model).
4. Weight units: `collect_units` walks the main graph's nodes of some op types, asks a
   stage's `unit_of(node)` for its unit (or why not), and sorts them into units and declined
   nodes, `--exclude` applied; `weight_initializer` is the first question every such stage
   asks (a default-domain node whose weight input is an initializer; otherwise `NOT_A_UNIT`,
   not listed); `tensor_readers` says which nodes of any graph scope read each tensor (a
   weight shared with another node is declined, not changed under it).
Fresh names come from `onnxshrink.engine.io.NameAllocator`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

import onnx

from onnxshrink.errors import UsageError


def compile_excludes(exclude: Iterable[str]) -> list[re.Pattern[str]]:
    """The `--exclude` regexes compiled (docstring, 1); UsageError naming a bad one."""
    patterns = []
    for text in exclude:
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise UsageError(f"--exclude {text!r} is not a valid regex: {exc}") from None
    return patterns


def excluded_by(node: onnx.NodeProto, patterns: Sequence[re.Pattern[str]]) -> str | None:
    """ "excluded by 'REGEX'" for the first pattern that excludes `node` (docstring, 1)."""
    for pattern in patterns:
        if pattern.search(node.name) or pattern.fullmatch(node.op_type):
            return f"excluded by {pattern.pattern!r}"
    return None


def drop_initializers(graph: onnx.GraphProto, names: Collection[str]) -> int:
    """Remove `graph`'s initializers named in `names` in place, without copying the others
    (docstring, 3); how many went."""
    if not names:
        return 0
    names = set(names)
    doomed = [i for i, t in enumerate(graph.initializer) if t.name in names]
    for index in reversed(doomed):
        del graph.initializer[index]
    return len(doomed)


def splice_nodes(
    graph: onnx.GraphProto,
    after: Mapping[int, Sequence[onnx.NodeProto]],
    new_initializers: Sequence[onnx.TensorProto] = (),
    dropped: Collection[str] = (),
) -> None:
    """Insert `after[i]` behind node i (-1: before all), drop the `dropped` initializers and
    their value_info, append `new_initializers` (docstring, 2). Edits `graph` in place."""
    nodes: list[onnx.NodeProto] = list(after.get(-1, ()))
    for index, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(index, ()))
    del graph.node[:]
    graph.node.extend(nodes)
    drop_initializers(graph, dropped)
    graph.initializer.extend(new_initializers)
    # a value_info of a dropped tensor would describe a tensor that no longer exists
    for value in [v for v in graph.value_info if v.name in dropped]:
        graph.value_info.remove(value)


Unit = TypeVar("Unit")

#: `unit_of`'s reason for a node with no constant weight (an activation product, an index
#: lookup): it is not a unit, and is not listed among the declined nodes (docstring, 4)
NOT_A_UNIT = "weight is not a constant"


def weight_initializer(
    node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]
) -> tuple[onnx.TensorProto | None, str | None]:
    """The initializer a node weighs its input with (input 0 of a Gather, 1 otherwise), or
    None and why: another domain, or `NOT_A_UNIT` (docstring, 4)."""
    if node.domain not in ("", "ai.onnx"):
        return None, "not a default-domain op"
    at = 0 if node.op_type == "Gather" else 1
    if len(node.input) <= at or node.input[at] not in inits:
        return None, NOT_A_UNIT
    return inits[node.input[at]], None


def collect_units(
    model: onnx.ModelProto,
    op_types: Collection[str],
    unit_of: Callable[[onnx.NodeProto], tuple[Unit | None, str | None]],
    patterns: Sequence[re.Pattern[str]],
) -> tuple[dict[str, Unit], dict[str, str]]:
    """Units by node name, and declined nodes with the reason (docstring, 4): `unit_of(node)`
    answers (unit, None) or (None, reason) for each main-graph node of `op_types`; a unit that
    `--exclude` matches is declined; nodes answering `NOT_A_UNIT` are left out."""
    units: dict[str, Unit] = {}
    declined: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        unit, reason = unit_of(node)
        if reason == NOT_A_UNIT:
            continue
        if unit is not None and reason is None:
            reason = excluded_by(node, patterns)
        if reason is not None or unit is None:
            declined[node.name] = reason or "not a unit"
            continue
        units[node.name] = unit
    return units, declined


def tensor_readers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The names of the nodes, in every graph scope, that read each tensor (docstring, 4)."""
    from onnxshrink.engine.io import graph_protos

    readers: dict[str, list[str]] = {}
    for graph in graph_protos(model.graph):
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node.name)
    return readers
