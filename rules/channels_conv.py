"""Channel groups of conv nets: the output channels `--sparsify channels:R` may remove.

`channel_groups(model)` follows every layer's output channels forward through the graph and
describes, as `onnxshrink.quant.sparsity.ChannelGroup`s, the tensors to slice when some of them
are removed; the stage (`onnxshrink.rules.prune_channels`) scores, removes and repairs them.
It reads the model only.

1. Producers: a layer whose output channels are its own makes a new group:
   a. Conv with `group == 1` and a constant weight `[O, I, k...]`: weight axis 0, bias axis 0;
   b. ConvTranspose with `group == 1`, weight `[I, O, k...]`: weight axis 1, bias axis 0;
   c. Gemm (no transA) with a constant B: B axis 1 (axis 0 with transB), its bias C when it
      is a vector (or `[1, N]`); MatMul with a constant 2-D `[K, N]` weight: axis 1.
   Channels run along axis 1 of NCHW outputs and along the last axis of Gemm/MatMul outputs;
   axes are kept negative (from the end) so that broadcasting need not know the rank.
2. Consumers: a linear layer reading channels slices its weight along its input axis (a
   `Consumer`: Conv and ConvTranspose axis 1 / axis 0, Gemm axis 0 / axis 1 with transB,
   MatMul axis 0); a consumer that is also a producer starts a new group at its output.
3. Pass-through ops carry channels unchanged to their output:
   a. elementwise unary ops (Relu, Clip with scalar bounds, HardSigmoid, HardSwish, Sigmoid,
      Tanh, LeakyRelu, ..., Identity, Dropout, Cast);
   b. binary elementwise ops (Add, Sub, Mul, Div, Max, Min, Sum, Mean, PRelu, Pow) with a
      constant operand: a scalar or a constant that is 1 along the channel axis passes
      through, a per-channel constant (`[1, C, 1, 1]`, `[C, 1, 1]`, `[C]` on the last axis) is
      sliced with the group;
   c. BatchNormalization and InstanceNormalization on axis 1: their parameters sliced;
   d. pooling (MaxPool, AveragePool, LpPool, their Global forms), Resize and Upsample with a
      scale of 1 on the channel axis (or a `sizes` entry, then set to the channels kept),
      Pad without padding on the channel axis;
   e. depthwise Conv / ConvTranspose (`group` == channels, weight `[C, 1, k...]`): weight
      axis 0 and bias sliced, the `group` attribute set to the channels kept
      (`ChannelGroup.attributes`).
4. Residuals: a binary elementwise op of two tensors carrying channels (a residual Add, the
   Mul of a squeeze-excitation gate with its trunk) ties their channels: their groups are
   merged (union-find) into one, removed together. Tensors of several groups (after a Concat)
   must line up group by group.
5. Concat along the channel axis: the output carries each input's channels at an offset (a
   `Slice.offset` in the consumers' weights); an input that carries no group keeps its
   channels, its width read from shape inference. A Concat along another axis of tensors of
   the same groups merges them as in 4.
6. Flatten (axis 1) or Reshape to `[N, C * H * W]` of a tensor with static spatial dims (as
   after GlobalAveragePool): each channel becomes `H * W` consecutive features
   (`Slice.per_channel`), read by a Gemm/MatMul consumer; a Reshape's shape constant that
   names the width gets a `shapes` entry.
7. Declined, the whole (merged) group with the reason: channels that reach a graph output,
   a subgraph, an op not modelled here (Shape, Split, Slice, Gather, Transpose, Reduce*,
   Softmax, LayerNormalization ...), a grouped conv that is not depthwise, a depthwise conv
   over several groups, an operand that is neither constant nor channel-carrying, a layer
   whose weight is not constant; groups of a single channel; groups whose constants are
   read by nodes outside the group (the stage gives such constants one copy per reader
   first).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxshrink.engine.io import array_of, graph_protos, node_subgraphs
from onnxshrink.engine.shapes import infer_shapes
from onnxshrink.quant.sparsity import ChannelGroup, Consumer, Slice

logger = logging.getLogger(__name__)

#: case 3a: ops whose output channel c depends only on input channel c
UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Celu",
        "HardSigmoid",
        "HardSwish",
        "Sigmoid",
        "Tanh",
        "Softplus",
        "Softsign",
        "Mish",
        "Gelu",
        "Erf",
        "Exp",
        "Log",
        "Sqrt",
        "Abs",
        "Neg",
        "Reciprocal",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "ThresholdedRelu",
        "Identity",
        "Dropout",
        "Cast",
        "Clip",
    }
)
#: case 3b / 4
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Pow"})
#: case 3d
POOLS = frozenset(
    {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class _Segment:
    """Channels of one group lying side by side in a tensor (None: channels of no group)."""

    group: int | None
    width: int
    per_channel: int = 1

    @property
    def size(self) -> int:
        return self.width * self.per_channel


@dataclass
class _Carried:
    """A tensor carrying channels: along `axis` (negative), the segments end to end."""

    axis: int
    segments: list[_Segment]
    rank: int | None = None

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def offsets(self) -> list[tuple[_Segment, int]]:
        out, at = [], 0
        for seg in self.segments:
            out.append((seg, at))
            at += seg.size
        return out

    def groups(self) -> list[int]:
        return [s.group for s in self.segments if s.group is not None]


@dataclass
class _Group(ChannelGroup):
    """A group while it is being traced (merged into its union-find root at the end): the
    contract's fields, the nodes it touches, and why it is declined, if it is."""

    activation_axis: int = 1
    nodes: set[str] = field(default_factory=set)
    declined: str | None = None


class _Decline(Exception):
    """The channels reaching this node cannot be followed (case 7); the message says why."""


class _Tracer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {t.name: t for t in model.graph.initializer}
        self.carried: dict[str, _Carried] = {}
        self.groups: list[_Group] = []
        self.parent: list[int] = []
        self.shapes = _static_shapes(model)
        self._arrays: dict[str, np.ndarray] = {}

    # -- union-find (case 4) -----------------------------------------------------------------
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo

    def new_group(self, node: onnx.NodeProto, width: int, axis: int) -> int:
        self.groups.append(_Group(node.name, node.op_type, width, activation_axis=axis))
        self.parent.append(len(self.parent))
        self.groups[-1].nodes.add(node.name)
        return len(self.groups) - 1

    def decline(self, carried: Sequence[_Carried | None], reason: str) -> None:
        for c in carried:
            if c is None:
                continue
            for g in c.groups():
                if self.groups[g].declined is None:
                    self.groups[g].declined = reason

    # -- helpers -----------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.asarray(array_of(self.inits[name]))
        return self._arrays[name]

    def const_dims(self, name: str) -> list[int] | None:
        tensor = self.inits.get(name)
        return None if tensor is None else list(tensor.dims)

    def weight(self, node: onnx.NodeProto, index: int) -> TensorProto:
        if len(node.input) <= index or node.input[index] not in self.inits:
            raise _Decline(f"{node.op_type} {node.name!r} has no constant weight")
        tensor = self.inits[node.input[index]]
        if tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            raise _Decline(f"{node.op_type} {node.name!r}: weight is not floating point")
        return tensor

    # -- the trace ---------------------------------------------------------------------------
    def trace(self) -> None:
        for node in self.graph.node:
            inputs = [self.carried.get(name) for name in node.input]
            carried_in = [c for c in inputs if c is not None]
            try:
                if node.domain not in _DEFAULT_DOMAINS:
                    if carried_in:
                        raise _Decline(f"op {node.domain}.{node.op_type} {node.name!r}")
                    continue
                self.visit(node, inputs)
            except _Decline as exc:
                self.decline(carried_in, f"channels reach {exc}")
                for name in node.output:
                    self.carried.pop(name, None)
        outputs = {o.name for o in self.graph.output}
        for name, c in self.carried.items():
            if name in outputs:
                self.decline([c], f"channels reach the graph output {name!r}")
        inner: set[str] = set()  # names read inside subgraphs (outer-scope values)
        for node in self.graph.node:
            for sub in node_subgraphs(node):
                for g in graph_protos(sub):
                    inner.update(i for n in g.node for i in n.input)
        for name in inner & set(self.carried):
            self.decline([self.carried[name]], f"channels reach a subgraph (as {name!r})")

    def visit(self, node: onnx.NodeProto, inputs: list[_Carried | None]) -> None:
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        carried_in = [c for c in inputs if c is not None]
        if not carried_in:
            self.produce(node, attrs)  # case 1 (or nothing)
            return
        where = f"{op} {node.name!r}"
        first = inputs[0]
        if any(c is not None for c in inputs[1:]) and op not in BINARY and op != "Concat":
            raise _Decline(f"{where} as a weight or parameter")
        if op in ("Conv", "ConvTranspose"):
            assert first is not None
            self.conv(node, attrs, first)
        elif op in ("Gemm", "MatMul"):
            assert first is not None
            self.linear(node, attrs, first)
        elif op in UNARY and op != "PRelu":
            assert first is not None
            if op == "Clip":
                for name in node.input[1:]:
                    if name and (self.const_dims(name) is None or _numel(name, self) != 1):
                        raise _Decline(f"{where} with bounds that are not constant scalars")
            if op == "Dropout" and len(node.output) > 1 and node.output[1]:
                raise _Decline(f"{where} with a mask output")
            if op == "Cast" and attrs.get("to") not in (
                TensorProto.FLOAT,
                TensorProto.FLOAT16,
                TensorProto.DOUBLE,
                TensorProto.BFLOAT16,
            ):
                raise _Decline(f"{where} to a non-float type")
            self.carried[node.output[0]] = first
        elif op in BINARY:
            self.binary(node, inputs)
        elif op in ("BatchNormalization", "InstanceNormalization"):
            assert first is not None
            self.normalization(node, first)
        elif op in POOLS:
            assert first is not None
            self.require_nchw(first, where)
            if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
                raise _Decline(f"{where} with an indices output")
            self.carried[node.output[0]] = first
        elif op in ("Resize", "Upsample"):
            assert first is not None
            self.resize(node, first)
        elif op == "Pad":
            assert first is not None
            self.pad(node, attrs, first)
        elif op == "Concat":
            self.concat(node, attrs, inputs)
        elif op in ("Flatten", "Reshape"):
            assert first is not None
            self.flatten(node, attrs, first)
        else:
            raise _Decline(f"{where}, an op whose channels are not modelled")

    def require_nchw(self, c: _Carried, where: str) -> None:
        if c.rank is None or c.rank < 3 or c.axis != 1 - c.rank:
            raise _Decline(f"{where}: channels not on axis 1 of an N-C-spatial tensor")
        if any(s.per_channel != 1 for s in c.segments):
            raise _Decline(f"{where}: flattened channels")

    # -- case 1 ------------------------------------------------------------------------------
    def produce(self, node: onnx.NodeProto, attrs: Mapping[str, object]) -> None:
        op = node.op_type
        try:
            if op in ("Conv", "ConvTranspose"):
                if attrs.get("group", 1) != 1:
                    return
                w = self.weight(node, 1)
                rank = len(w.dims)
                if rank < 3:
                    return
                out_axis = 0 if op == "Conv" else 1
                width = w.dims[out_axis]
                has_bias = len(node.input) > 2 and bool(node.input[2])
                if has_bias and node.input[2] not in self.inits:
                    return
                g = self.new_group(node, width, 1)
                self.groups[g].producers.append(Slice(w.name, out_axis))
                if has_bias:
                    self.groups[g].producers.append(Slice(node.input[2], 0))
                self.carried[node.output[0]] = _Carried(1 - rank, [_Segment(g, width)], rank)
            elif op == "Gemm":
                if attrs.get("transA", 0):
                    return
                w = self.weight(node, 1)
                if len(w.dims) != 2:
                    return
                axis = 0 if attrs.get("transB", 0) else 1
                width = w.dims[axis]
                bias: Slice | None = None
                if len(node.input) > 2 and node.input[2]:
                    dims = self.const_dims(node.input[2])
                    if dims is None:
                        return
                    if dims in ([width], [1, width]):
                        bias = Slice(node.input[2], len(dims) - 1)
                    elif int(np.prod(dims)) != 1:
                        return
                g = self.new_group(node, width, -1)
                self.groups[g].producers.append(Slice(w.name, axis))
                if bias is not None:
                    self.groups[g].producers.append(bias)
                self.carried[node.output[0]] = _Carried(-1, [_Segment(g, width)], 2)
            elif op == "MatMul":
                w = self.weight(node, 1)
                if len(w.dims) != 2:
                    return
                width = w.dims[1]
                g = self.new_group(node, width, -1)
                self.groups[g].producers.append(Slice(w.name, 1))
                shape = self.shapes.get(node.output[0])
                known = len(shape) if shape is not None else None
                self.carried[node.output[0]] = _Carried(-1, [_Segment(g, width)], known)
        except _Decline:
            return  # not a producer; its output carries no group

    # -- cases 2, 3e --------------------------------------------------------------------------
    def conv(self, node: onnx.NodeProto, attrs: Mapping[str, object], c: _Carried) -> None:
        op, where = node.op_type, f"{node.op_type} {node.name!r}"
        self.require_nchw(c, where)
        w = self.weight(node, 1)
        group = int(attrs.get("group", 1))  # type: ignore[call-overload]
        if group == 1:
            in_axis = 1 if op == "Conv" else 0
            if w.dims[in_axis] != c.size:
                raise _Decline(f"{where}: weight does not match its input channels")
            for seg, offset in c.offsets():
                if seg.group is not None:
                    consumer = Consumer(node.name, Slice(w.name, in_axis, 1, offset))
                    grp = self.groups[seg.group]
                    grp.consumers.append(consumer)
                    grp.nodes.add(node.name)
                    if len(c.segments) == 1:
                        grp.activations.append(node.input[0])
            self.produce(node, attrs)
            return
        # case 3e: depthwise
        if not (group == c.size == w.dims[0] and w.dims[1] == 1):
            raise _Decline(f"{where}, a grouped conv that is not depthwise")
        if len(c.segments) != 1 or c.segments[0].group is None:
            raise _Decline(f"{where}, a depthwise conv over several groups")
        grp = self.groups[c.segments[0].group]
        grp.producers.append(Slice(w.name, 0))
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in self.inits:
                raise _Decline(f"{where} with a non-constant bias")
            grp.producers.append(Slice(node.input[2], 0))
        grp.attributes.append((node.name, "group", 1))
        grp.nodes.add(node.name)
        self.carried[node.output[0]] = c

    def linear(self, node: onnx.NodeProto, attrs: Mapping[str, object], c: _Carried) -> None:
        where = f"{node.op_type} {node.name!r}"
        if c.axis != -1:
            raise _Decline(f"{where}: channels not on the reduction axis")
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            raise _Decline(f"{where} with transA")
        w = self.weight(node, 1)
        if len(w.dims) != 2:
            raise _Decline(f"{where}: weight is not 2-D")
        in_axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0
        if w.dims[in_axis] != c.size:
            raise _Decline(f"{where}: weight does not match its input features")
        for seg, offset in c.offsets():
            if seg.group is not None:
                grp = self.groups[seg.group]
                grp.consumers.append(
                    Consumer(node.name, Slice(w.name, in_axis, seg.per_channel, offset))
                )
                grp.nodes.add(node.name)
        self.produce(node, attrs)

    # -- cases 3b, 4 --------------------------------------------------------------------------
    def binary(self, node: onnx.NodeProto, inputs: list[_Carried | None]) -> None:
        where = f"{node.op_type} {node.name!r}"
        carried = [c for c in inputs if c is not None]
        base = carried[0]
        for other in carried[1:]:
            layout = [(s.width, s.per_channel) for s in other.segments]
            if other.axis != base.axis or layout != [
                (s.width, s.per_channel) for s in base.segments
            ]:
                raise _Decline(f"{where}: its operands' channels do not line up")
        for name, c in zip(node.input, inputs, strict=True):
            if c is not None or not name:
                continue
            dims = self.const_dims(name)
            if dims is None:
                raise _Decline(f"{where}: operand {name!r} is neither constant nor channels")
            self.channel_constant(node, name, dims, base, where)
        for other in carried[1:]:
            for a, b in zip(base.segments, other.segments, strict=True):
                if a.group is not None and b.group is not None:
                    self.union(a.group, b.group)
                elif (a.group is None) != (b.group is None):
                    raise _Decline(f"{where}: a group meets fixed channels")
        rank = max((c.rank for c in carried if c.rank is not None), default=None)
        self.carried[node.output[0]] = _Carried(base.axis, base.segments, rank)

    def channel_constant(
        self, node: onnx.NodeProto, name: str, dims: list[int], c: _Carried, where: str
    ) -> None:
        """A constant operand broadcast against channels (case 3b): passes, or is sliced."""
        position = len(dims) + c.axis  # the constant's axis facing the channels
        if position < 0 or dims[position] == 1:
            return
        if dims[position] != c.size:
            raise _Decline(f"{where}: constant {name!r} does not broadcast over the channels")
        if any(d != 1 for i, d in enumerate(dims) if i != position):
            raise _Decline(f"{where}: constant {name!r} varies along other axes too")
        for seg, offset in c.offsets():
            if seg.group is not None:
                grp = self.groups[seg.group]
                grp.producers.append(Slice(name, position, seg.per_channel, offset))
                grp.nodes.add(node.name)

    def normalization(self, node: onnx.NodeProto, c: _Carried) -> None:
        where = f"{node.op_type} {node.name!r}"
        self.require_nchw(c, where)
        if any(name for name in node.output[1:]):
            raise _Decline(f"{where} with training outputs")
        for name in node.input[1:]:
            if name not in self.inits or self.const_dims(name) != [c.size]:
                raise _Decline(f"{where}: parameter {name!r} is not a constant vector")
            for seg, offset in c.offsets():
                if seg.group is not None:
                    self.groups[seg.group].producers.append(Slice(name, 0, 1, offset))
                    self.groups[seg.group].nodes.add(node.name)
        self.carried[node.output[0]] = c

    # -- case 3d -----------------------------------------------------------------------------
    def resize(self, node: onnx.NodeProto, c: _Carried) -> None:
        where = f"{node.op_type} {node.name!r}"
        self.require_nchw(c, where)
        assert c.rank is not None
        channel = c.rank + c.axis
        scales_at = 1 if node.op_type == "Upsample" else 2
        if node.op_type == "Resize" and len(node.input) == 2:  # opset 10: scales second
            scales_at = 1
        scales = node.input[scales_at] if len(node.input) > scales_at else ""
        sizes = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
        if scales and self.const_dims(scales) != [0]:
            if scales not in self.inits:
                raise _Decline(f"{where}: scales are not constant")
            values = self.array(scales).reshape(-1)
            if len(values) != c.rank or values[channel] != 1:
                raise _Decline(f"{where} scales the channel axis")
        if sizes:
            if sizes not in self.inits:
                raise _Decline(f"{where}: sizes are not constant")
            values = self.array(sizes).reshape(-1)
            if len(values) != c.rank or len(c.segments) != 1 or c.segments[0].group is None:
                raise _Decline(f"{where}: sizes over several groups")
            self.groups[c.segments[0].group].shapes.append((sizes, channel, 1))
            self.groups[c.segments[0].group].nodes.add(node.name)
        self.carried[node.output[0]] = c

    def pad(self, node: onnx.NodeProto, attrs: Mapping[str, object], c: _Carried) -> None:
        where = f"Pad {node.name!r}"
        self.require_nchw(c, where)
        assert c.rank is not None
        if "pads" in attrs:
            pads = np.asarray(attrs["pads"])
        elif len(node.input) > 1 and node.input[1] in self.inits:
            pads = self.array(node.input[1]).reshape(-1)
        else:
            raise _Decline(f"{where}: pads are not constant")
        if len(node.input) > 3 and node.input[3]:
            raise _Decline(f"{where} with axes")
        channel = c.rank + c.axis
        if len(pads) != 2 * c.rank or pads[channel] or pads[channel + c.rank]:
            raise _Decline(f"{where} pads the channel axis")
        self.carried[node.output[0]] = c

    # -- case 5 ------------------------------------------------------------------------------
    def concat(
        self, node: onnx.NodeProto, attrs: Mapping[str, object], inputs: list[_Carried | None]
    ) -> None:
        where = f"Concat {node.name!r}"
        carried = [c for c in inputs if c is not None]
        rank = next((c.rank for c in carried if c.rank is not None), None)
        axis = int(attrs.get("axis", 1))  # type: ignore[call-overload]
        if axis >= 0:
            if rank is None:
                raise _Decline(f"{where}: rank unknown")
            axis -= rank
        base = carried[0]
        if axis != base.axis:  # along another axis: like a binary op (case 4)
            if len(carried) != len(inputs):
                raise _Decline(f"{where}: joins channels with other tensors")
            layout = [(s.width, s.per_channel) for s in base.segments]
            for other in carried[1:]:
                if other.axis != base.axis or layout != [
                    (s.width, s.per_channel) for s in other.segments
                ]:
                    raise _Decline(f"{where}: its inputs' channels do not line up")
                for a, b in zip(base.segments, other.segments, strict=True):
                    if a.group is not None and b.group is not None:
                        self.union(a.group, b.group)
            self.carried[node.output[0]] = base
            return
        segments: list[_Segment] = []
        for name, c in zip(node.input, inputs, strict=True):
            if c is not None:
                if c.axis != axis:
                    raise _Decline(f"{where}: inputs with channels on different axes")
                segments.extend(c.segments)
                continue
            shape = self.shapes.get(name) or self.const_dims(name)
            if shape is None or rank is None or len(shape) != rank or shape[axis] is None:
                raise _Decline(f"{where}: input {name!r} of unknown width")
            segments.append(_Segment(None, int(shape[axis])))
        self.carried[node.output[0]] = _Carried(axis, segments, rank)

    # -- case 6 ------------------------------------------------------------------------------
    def flatten(self, node: onnx.NodeProto, attrs: Mapping[str, object], c: _Carried) -> None:
        where = f"{node.op_type} {node.name!r}"
        self.require_nchw(c, where)
        shape = self.shapes.get(node.input[0])
        if shape is None or any(d is None for d in shape[2:]):
            raise _Decline(f"{where}: spatial dims not static")
        spatial = int(np.prod([int(d) for d in shape[2:]]))  # type: ignore[arg-type]
        if node.op_type == "Flatten":
            if int(attrs.get("axis", 1)) != 1:  # type: ignore[call-overload]
                raise _Decline(f"{where} not at axis 1")
        else:
            target = node.input[1] if len(node.input) > 1 else ""
            if target not in self.inits:
                raise _Decline(f"{where}: shape is not constant")
            values = [int(v) for v in self.array(target).reshape(-1)]
            if (
                len(values) != 2
                or values[1] not in (-1, c.size * spatial)
                or values[0] == -1
                and values[1] == -1
            ):
                raise _Decline(f"{where} to a shape other than [N, C * spatial]")
            if values[0] not in (0, -1) and (shape[0] is None or values[0] != shape[0]):
                raise _Decline(f"{where} changes the batch")
            if values[1] != -1:
                if len(c.segments) != 1 or c.segments[0].group is None:
                    raise _Decline(f"{where} of several groups with a fixed width")
                self.groups[c.segments[0].group].shapes.append((target, 1, spatial))
                self.groups[c.segments[0].group].nodes.add(node.name)
        segments = [_Segment(s.group, s.width, spatial) for s in c.segments]
        self.carried[node.output[0]] = _Carried(-1, segments, 2)

    # -- the result --------------------------------------------------------------------------
    def result(self) -> tuple[list[ChannelGroup], dict[str, str]]:
        merged: dict[int, list[int]] = {}
        for g in range(len(self.groups)):
            merged.setdefault(self.find(g), []).append(g)
        readers: dict[str, set[str]] = {}
        for node in self.graph.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.name)
        groups: list[ChannelGroup] = []
        declined: dict[str, str] = {}
        for root, members in merged.items():
            head = self.groups[root]
            out = ChannelGroup(head.unit, head.op, head.width, activation_axis=head.activation_axis)
            nodes: set[str] = set()
            reason = None
            for g in members:
                grp = self.groups[g]
                reason = reason or grp.declined
                _extend(out.producers, grp.producers)
                _extend(out.consumers, grp.consumers)
                _extend(out.attributes, grp.attributes)
                _extend(out.shapes, grp.shapes)
                if grp.activation_axis == head.activation_axis:
                    _extend(out.activations, grp.activations)
                nodes |= grp.nodes
            if len(members) > 1 and reason is None:
                logger.debug("%s: %d producers tied by residuals", head.unit, len(members))
            if reason is None and head.width < 2:
                reason = "a single channel"
            if reason is None:
                touched = {s.tensor for s in out.producers} | {
                    c.weight.tensor for c in out.consumers
                }
                touched |= {name for name, _, _ in out.shapes}
                for name in sorted(touched):
                    others = readers.get(name, set()) - nodes
                    if others:
                        reason = f"constant {name!r} is also read by {sorted(others)[0]!r}"
                        break
            if reason is not None:
                if len(members) > 1:
                    reason += f" (a group of {len(members)} tied producers)"
                declined[head.unit] = reason
                continue
            groups.append(out)
        return groups, declined


def _extend(target: list, items: Sequence) -> None:
    for item in items:
        if item not in target:
            target.append(item)


def _numel(name: str, tracer: _Tracer) -> int:
    dims = tracer.const_dims(name)
    return 0 if dims is None else int(np.prod(dims)) if dims else 1


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes from onnx shape inference: dims as ints, None where symbolic or unknown."""
    inferred = infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        tt = value.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shapes[value.name] = [
            d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
        ]
    return shapes


def channel_groups(model: onnx.ModelProto) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The conv net's channel groups (module docstring), and declined producers with the reason.

    Every group's tensors are read only by the group's nodes (case 7); `model` is not changed.
    """
    tracer = _Tracer(model)
    tracer.trace()
    return tracer.result()


__all__ = ["BINARY", "POOLS", "UNARY", "channel_groups"]
