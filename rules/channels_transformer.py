"""Channel groups of transformer blocks: FFN neurons and attention heads (`--sparsify channels:R`).

Post-training structured pruning of a transformer (Kwon et al., 2022) removes whole FFN
neurons (the intermediate width between a block's two linear layers) and whole attention
heads. This module finds them on the exported graph, whatever names the exporter gave, and
describes each as a `ChannelGroup` (`onnxshrink.quant.sparsity`); the stage
(`onnxshrink.rules.prune_channels`) scores, removes and repairs them.

1. FFN neurons. A MatMul `x @ W1` with a constant `[K, F]` weight starts a group of F channels
   on the last axis. The channels flow forward through:
   a. Add/Sub/Mul/Div/Pow with a constant that is a scalar (left alone) or a vector of F values
      (sliced with the group: a bias);
   b. those ops, and Where, between two tensors both in the group (a decomposed GELU multiplies
      `x` by `1 + erf(x / sqrt 2)`);
   c. unary elementwise ops (Erf, Tanh, Sigmoid, Relu, Gelu, Cast, ...).
   They end at MatMuls that read them as the first input with a constant `[F, N]` weight (the
   consumers: rows sliced, and refit by reconstruction). Reaching anything else (a graph output,
   a Reshape, a reduction, a second input of a MatMul) declines the group.
2. Attention heads. A projection `x @ Wq (+ b)` with a constant `[K, C]` weight whose output is
   reshaped to split the last axis into `(H, d)` (a Reshape whose constant shape keeps the
   leading dims (0 or -1 at most once) and ends in `[-1 or H, d]`, `H * d = C`) starts a head
   track: its head axis is the Reshape's second-to-last. The head axis is followed through
   Transpose (the axis permuted), elementwise ops with scalars or with tensors that do not run
   over it, Softmax over another axis, a MatMul of two tracked tensors (the attention scores and
   the context: the head axis is a batch axis there; the two tracks are one group), Shape
   (read for dynamic shapes, not followed), and Reshapes that leave it where it is (same rank).
   The track ends where a Reshape merges the head axis with the last one (`[.., H, d] ->
   [.., H*d]`) and a MatMul with a constant `[C, N]` weight reads it (the output projection:
   the consumer). The Q, K and V projections whose tracks meet form one group of H channels of
   `d` columns each (`Slice.per_channel`). Entries of constant Reshape shapes that spell H out
   are listed in `ChannelGroup.shapes`; a shape constant shared with another group declines
   both (they could be pruned to different counts).
3. A group whose channels reach an op not listed is declined with the op named. Anything the
   static analysis cannot prove (shapes computed at run time) is checked by running: the
   stage runs the pruned model before it trusts a plan.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from onnxshrink.engine.io import array_of, structure_only
from onnxshrink.quant.sparsity import ChannelGroup, Consumer, Slice

#: elementwise ops of one input that keep channels where they are (cases 1c, 2)
UNARY = frozenset(
    {
        "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Gelu", "FastGelu", "Elu", "Selu",
        "Softplus", "HardSigmoid", "HardSwish", "Exp", "Log", "Sqrt", "Neg", "Abs", "Cast",
        "Identity", "Clip", "IsNaN", "Not", "Reciprocal", "Sin", "Cos", "Mish", "Swish",
    }
)  # fmt: skip
#: elementwise ops of two inputs (cases 1a, 1b, 2)
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Greater", "Less"})
#: the minimum channels a group must have to be worth pruning
MIN_WIDTH = 8

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


class _Graph:
    """Producers, consumers, constants and inferred ranks of one (main) graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnxshrink.engine.shapes import infer_shapes

        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in model.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node
        self.outputs = {o.name for o in model.graph.output}
        self.shapes: dict[str, list[int | str]] = {}
        try:
            inferred = infer_shapes(structure_only(model))
        except Exception:  # shapes help; without them the run check decides
            inferred = None
        if inferred is not None:
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                t = v.type.tensor_type
                if t.HasField("shape"):
                    self.shapes[v.name] = [d.dim_param or d.dim_value for d in t.shape.dim]

    def const(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else array_of(tensor)

    def dims(self, name: str) -> list[int] | None:
        tensor = self.inits.get(name)
        return None if tensor is None else list(tensor.dims)

    def rank(self, name: str) -> int | None:
        if name in self.inits:
            return len(self.inits[name].dims)
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def _label(node: onnx.NodeProto) -> str:
    """A node's name, or its first output's where it has none (names unit groups)."""
    return node.name or node.output[0]


def _linear_weight(graph: _Graph, node: onnx.NodeProto) -> list[int] | None:
    """The dims of a MatMul's constant 2-D float second input, else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    tensor = graph.inits.get(node.input[1])
    if tensor is None or tensor.data_type not in _FLOATS or len(tensor.dims) != 2:
        return None
    return list(tensor.dims)


def channel_groups(model: onnx.ModelProto) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The model's FFN-neuron and attention-head groups (cases 1, 2), and the nodes that
    started a group that was declined, with the reason."""
    graph = _Graph(model)
    groups: list[ChannelGroup] = []
    declined: dict[str, str] = {}
    heads, head_starts, head_declined = _head_groups(graph)
    groups.extend(heads)
    declined.update(head_declined)
    for node in model.graph.node:
        dims = _linear_weight(graph, node)
        if dims is None or _label(node) in head_starts:
            continue
        group, reason = _ffn_group(graph, node, dims)
        if group is not None:
            groups.append(group)
        elif reason is not None:
            declined[_label(node)] = reason
    _drop_shared(groups, declined)
    return groups, declined


# -------------------------------------------------------------------------------------------
# Case 1: FFN neurons


def _ffn_group(
    graph: _Graph, start: onnx.NodeProto, dims: list[int]
) -> tuple[ChannelGroup | None, str | None]:
    width = dims[1]
    if width < MIN_WIDTH:
        return None, None
    producers = [Slice(start.input[1], 1)]
    consumers: list[Consumer] = []
    activations: list[str] = []
    seen: set[str] = set()
    todo = [start.output[0]]
    members = {start.output[0]}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in graph.outputs:
            return None, None  # a graph output carries the channels: not an FFN
        for node in graph.consumers.get(name, []):
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                return None, None
            if op in UNARY:
                members.add(node.output[0])
                todo.append(node.output[0])
                continue
            if op in BINARY or op == "Where":
                for other in node.input:
                    if other == name or other in members or not other:
                        continue
                    value = graph.dims(other)
                    if value is None:
                        # a tensor of the group reached from another path is fine once seen
                        if other in graph.producer and _reaches(graph, other, members):
                            continue
                        return None, None
                    size = int(np.prod(value)) if value else 1
                    if size == 1:
                        continue
                    if value[-1:] == [width] and size == width:
                        producers.append(Slice(other, len(value) - 1))
                        continue
                    return None, None
                members.add(node.output[0])
                todo.append(node.output[0])
                continue
            weight = _linear_weight(graph, node)
            if weight is not None and node.input[0] == name and weight[0] == width:
                consumers.append(Consumer(_label(node), Slice(node.input[1], 0)))
                activations.append(name)
                continue
            return None, None
    if not consumers:
        return None, None
    return (
        ChannelGroup(
            unit=_label(start),
            op="FFN neurons",
            width=width,
            producers=producers,
            consumers=consumers,
            activations=list(dict.fromkeys(activations)),
            activation_axis=-1,
        ),
        None,
    )


def _reaches(graph: _Graph, name: str, members: set[str]) -> bool:
    """Whether `name` is computed from a member of the group through elementwise ops only."""
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in members:
            return True
        if current in seen or current not in graph.producer:
            continue
        seen.add(current)
        node = graph.producer[current]
        if node.op_type in UNARY or node.op_type in BINARY or node.op_type == "Where":
            todo.extend(i for i in node.input if i and i not in graph.inits)
    return False


# -------------------------------------------------------------------------------------------
# Case 2: attention heads


class _Track:
    """One head track: the projection that starts it, its head count and size."""

    def __init__(self, node: onnx.NodeProto, bias: str | None, heads: int, size: int) -> None:
        self.node = node
        self.bias = bias
        self.heads = heads
        self.size = size


def _head_groups(graph: _Graph) -> tuple[list[ChannelGroup], set[str], dict[str, str]]:
    """Case 2: the head groups, the projections in them, and declined projections."""
    tracks: dict[str, _Track] = {}
    axis_of: dict[str, tuple[str, int]] = {}  # tensor -> (track id, head axis)
    parent: dict[str, str] = {}
    shapes_of: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    ends: dict[str, list[tuple[str, str]]] = defaultdict(list)  # track -> (consumer, input)
    failed: dict[str, str] = {}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    for node in graph.model.graph.node:
        dims = _linear_weight(graph, node)
        if dims is None:
            continue
        out, bias = node.output[0], None
        nexts = graph.consumers.get(out, [])
        if len(nexts) == 1 and nexts[0].op_type == "Add":
            other = [i for i in nexts[0].input if i != out]
            if len(other) == 1 and graph.dims(other[0]) == [dims[1]]:
                bias, out = other[0], nexts[0].output[0]
                nexts = graph.consumers.get(out, [])
        if len(nexts) != 1 or nexts[0].op_type != "Reshape":
            continue
        split = _head_split(graph, nexts[0], dims[1])
        if split is None:
            continue
        heads, size, axis, shape_entry = split
        tid = _label(node)
        tracks[tid] = _Track(node, bias, heads, size)
        parent[tid] = tid
        axis_of[nexts[0].output[0]] = (tid, axis)
        if shape_entry is not None:
            shapes_of[tid].append(shape_entry)
    if not tracks:
        return [], set(), {}

    for name in axis_of:
        if name in graph.outputs:
            failed[axis_of[name][0]] = "heads reach a graph output"
    pending = [(name, node) for name in axis_of for node in graph.consumers.get(name, [])]
    while pending:
        waiting: list[tuple[str, onnx.NodeProto]] = []
        grew = False
        while pending:
            name, node = pending.pop()
            tid, axis = axis_of[name]
            result = _follow(graph, node, name, axis, axis_of, union, tid)
            if result == _WAIT:  # the MatMul's other side may be tracked later
                waiting.append((name, node))
                continue
            if isinstance(result, str):
                failed.setdefault(tid, f"heads reach {node.op_type} {node.name!r} ({result})")
                continue
            if result is None:
                continue
            kind, value = result
            if kind == "end":
                ends[tid].append((value, node.output[0]))
                continue
            out, new_axis = node.output[0], value
            if out in axis_of:
                if axis_of[out][1] != new_axis:
                    failed.setdefault(tid, f"head axis moves inconsistently at {node.name!r}")
                union(axis_of[out][0], tid)
                continue
            axis_of[out] = (tid, new_axis)
            grew = True
            if out in graph.outputs:
                failed.setdefault(tid, "heads reach a graph output")
            pending.extend((out, n) for n in graph.consumers.get(out, []))
        if waiting and not grew:
            for name, node in waiting:
                tid = axis_of[name][0]
                failed.setdefault(tid, f"heads reach MatMul {node.name!r} ({_WAIT})")
            break
        pending = waiting

    members: dict[str, list[str]] = defaultdict(list)
    for tid in tracks:
        members[find(tid)].append(tid)
    groups: list[ChannelGroup] = []
    starts: set[str] = set()
    declined: dict[str, str] = {}
    for root, tids in members.items():
        first = tracks[tids[0]]
        reason = next((failed[t] for t in tids if t in failed), failed.get(root))
        if reason is None and any(
            (tracks[t].heads, tracks[t].size) != (first.heads, first.size) for t in tids
        ):
            reason = "projections split into different head counts"
        consumer_ends = [e for t in tids for e in ends.get(t, [])]
        if reason is None and not consumer_ends:
            reason = "no output projection reads the heads"
        if reason is None and len(tids) < 2:
            reason = "a single projection: not an attention block"
        starts.update(tids)
        if reason is not None:
            for t in tids:
                declined[t] = reason
            continue
        producers: list[Slice] = []
        for t in tids:
            producers.append(Slice(tracks[t].node.input[1], 1, first.size))
            if tracks[t].bias is not None:
                producers.append(Slice(str(tracks[t].bias), 0, first.size))
        consumers = []
        activations = []
        for consumer, _ in consumer_ends:
            node = next(n for n in graph.model.graph.node if _label(n) == consumer)
            consumers.append(Consumer(consumer, Slice(node.input[1], 0, first.size)))
            activations.append(node.input[0])
        groups.append(
            ChannelGroup(
                unit=tids[0],
                op="attention heads",
                width=first.heads,
                producers=producers,
                consumers=list(dict.fromkeys(consumers)),
                shapes=list(dict.fromkeys(s for t in tids for s in shapes_of.get(t, []))),
                activations=list(dict.fromkeys(activations)),
                activation_axis=-1,
            )
        )
    return groups, starts, declined


def _head_split(
    graph: _Graph, reshape: onnx.NodeProto, channels: int
) -> tuple[int, int, int, tuple[str, int, int] | None] | None:
    """(heads, head size, head axis, shape entry naming H or None) when `reshape` splits the
    last axis of `channels` into `[H, d]` and keeps the leading dims (case 2)."""
    shape = graph.const(reshape.input[1]) if len(reshape.input) > 1 else None
    if shape is None or shape.ndim != 1 or len(shape) < 3:
        return None
    in_rank = graph.rank(reshape.input[0])
    if in_rank is not None and len(shape) != in_rank + 1:
        return None
    size = int(shape[-1])
    if size <= 0 or channels % size:
        return None
    heads = channels // size
    if int(shape[-2]) not in (-1, heads) or heads < 2:
        return None
    lead = [int(v) for v in shape[:-2]]
    if any(v not in (0,) for v in lead) and -1 in lead:
        return None
    if int(shape[-2]) == -1 and -1 in lead:
        return None
    entry = (reshape.input[1], len(shape) - 2, 1) if int(shape[-2]) == heads else None
    return heads, size, len(shape) - 2, entry


#: `_follow`'s answer for a MatMul whose other input is not (yet) on a head track
_WAIT = "a MatMul with a tensor outside the heads"


def _follow(graph, node, name, axis, axis_of, union, tid):
    """Where the head axis of `name` goes through `node` (case 2): ("axis", a) for the output,
    ("end", consumer) at a merge Reshape read by an output projection, None when the node
    does not carry it on (Shape), or a reason string when it cannot be followed."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return "not a default-domain op"
    if op == "Shape":
        return None
    if op == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm is None:
            return "Transpose without perm"
        return ("axis", perm.index(axis))
    if op in UNARY:
        return ("axis", axis)
    if op in ("Softmax", "LogSoftmax"):
        rank = graph.rank(name)
        along = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if rank is not None and along % rank == axis:
            return "softmax over the heads"
        return ("axis", axis)
    if op in BINARY or op == "Where":
        rank = graph.rank(name)
        for other in node.input:
            if not other or other == name:
                continue
            if other in axis_of:
                if axis_of[other][1] != axis:
                    return "head axes do not line up"
                union(axis_of[other][0], tid)
                continue
            dims = graph.dims(other)
            if dims is not None:
                if rank is None or len(dims) < rank - axis or dims[len(dims) - (rank - axis)] == 1:
                    continue
                return "a constant runs over the heads"
            # a tensor of unknown extent over the heads (a broadcast mask, [B, 1, 1, S]): the
            # stage's run check decides whether it broadcasts
        return ("axis", axis)
    if op == "MatMul":
        rank = graph.rank(name)
        if rank is None or axis >= rank - 2:
            return "heads on a MatMul's matrix axes"
        other = node.input[1] if node.input[0] == name else node.input[0]
        if other in axis_of:
            if axis_of[other][1] != axis:
                return "head axes do not line up"
            union(axis_of[other][0], tid)
            return ("axis", axis)
        return _WAIT  # the other side may not be tracked yet
    if op == "Reshape":
        in_shape = graph.shapes.get(name)
        out_shape = graph.shapes.get(node.output[0])
        rank = graph.rank(name)
        if rank is not None and out_shape is not None and len(out_shape) == rank - 1:
            if axis != rank - 2:
                return "a Reshape that merges other axes with the heads"
            shape = graph.const(node.input[1])
            if shape is not None and int(shape[-1]) not in (-1,) and int(shape[-1]) > 0:
                return "a merge Reshape that spells out the width"
            readers = graph.consumers.get(node.output[0], [])
            ends = []
            for reader in readers:
                dims = _linear_weight(graph, reader)
                if dims is None or reader.input[0] != node.output[0]:
                    return f"merged heads read by {reader.op_type} {reader.name!r}"
                ends.append(_label(reader))
            if len(ends) != 1:
                return "merged heads read by several layers"
            return ("end", ends[0])
        if (
            in_shape is not None
            and out_shape is not None
            and len(in_shape) == len(out_shape)
            and (out_shape[axis] == in_shape[axis] or isinstance(out_shape[axis], str))
        ):
            return ("axis", axis)  # same rank: the stage's run check proves it keeps the heads
        return "a Reshape that moves the heads"
    return f"{op} is not followed"


def _drop_shared(groups: list[ChannelGroup], declined: dict[str, str]) -> None:
    """Case 2: groups sharing a shape constant or a weight with another group are declined."""
    owners: dict[str, set[str]] = defaultdict(set)
    for group in groups:
        for s in group.producers:
            owners[s.tensor].add(group.unit)
        for c in group.consumers:
            owners[c.weight.tensor].add(group.unit)
        for tensor, _, _ in group.shapes:
            owners[tensor].add(group.unit)
    shared = {u for units in owners.values() if len(units) > 1 for u in units}
    for group in list(groups):
        if group.unit in shared:
            groups.remove(group)
            declined[group.unit] = "shares a weight or shape constant with another group"


__all__ = ["channel_groups"]
