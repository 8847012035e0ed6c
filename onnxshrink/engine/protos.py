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
Fresh names come from `onnxshrink.engine.io.NameAllocator`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence

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
