"""Float16 materialization: chosen nodes compute in float16, graph inputs and outputs stay float32.

The `--quantize fp16` stage (weights and compute in float16, the usual first step for CUDA and
TensorRT). `fp16_candidates` says which nodes may run in float16 and why the others may not
(the stage's plan); the engine's budget search (`onnxshrink.quant.lossy.PlannedStage`) keeps the
nodes whose float16 error is largest in float32 until the error budget holds; `convert_float16`
rewrites the model for the chosen subset (the materialization). `STAGE` is what
`onnxshrink.rules.LOSSY_STAGES` lists: this module is the whole stage.
Nodes are named as `onnxshrink.engine.io.named_copy` names them (an unnamed node becomes
`<op_type>_<index>`), in both functions, so the names of one are valid for the other.

1. Candidates. A main-graph node may run in float16 unless:
   a. it is inside a subgraph (If/Loop/Scan bodies): only the main graph is converted;
   b. it is matched by `exclude` (a regex found in its name, `re.search`, or matching its op
      type in full, `re.fullmatch`);
   c. it is not in the default (ai.onnx) domain; (a Constant node is data: case 4)
   d. it only reads the shape of its input (Shape, Size): it runs on either dtype, so it never
      needs a Cast (case 5c) and has nothing to convert;
   e. its op is not in `FLOAT16_OPS`, the ops meant to run in float16 on a GPU (ONNX Runtime
      CUDA, TensorRT) that stay in float16's range on ordinary activations (no Exp, ReduceSum,
      ReduceProd, CumSum: they overflow 65504 easily);
   f. it touches no float32 tensor (integer shape arithmetic: Gather/Concat/Unsqueeze on int64);
   g. a float32 tensor of it has an unknown dtype (e.g. downstream of a custom op, with no
      value_info), or its schema at the model's opset does not allow float16 for a type
      parameter bound to float32.
2. Which inputs and outputs of a converted node become float16: every input or output bound,
   in the op's schema, to a type parameter that is float32 in this node. Inputs and outputs
   with a fixed type stay float32: LayerNormalization's Mean and InvStdDev (type U, float32 or
   bfloat16 only) and Resize's `scales` (`tensor(float)`). Resize's `roi` (T2: coordinates,
   usually empty) is kept float32 too, the dtype every Resize implementation accepts. Two ops
   carry their output type in an attribute: Cast(to=FLOAT) becomes Cast(to=FLOAT16), and
   ConstantOfShape's `value` becomes a float16 tensor (a missing `value`, float32 0, becomes
   float16 0).
3. Names. Every original tensor name keeps its float32 meaning: graph inputs and outputs keep
   their names, dtypes and shapes, and subgraph bodies that read outer tensors by name keep
   reading float32. The float16 version of a tensor gets a new name, `<name>_fp16`; a
   converted node's output is renamed to it. (Only constants are converted in place, case 4.)
4. Constants (initializers that are not graph inputs, and Constant nodes of the main graph)
   read by float16 inputs are converted ahead of time, no Cast:
   a. read only by float16 inputs (and shape readers): converted in place, same name;
   b. also read by float32 inputs (a node kept float32, a pinned input of case 2, a subgraph):
      a separate float16 copy `<name>_fp16` for the float16 readers;
   c. values: finite |v| > 65504 are clipped to +-65504 (else they would become inf), counted
      in `values_clipped`; non-zero values too small for float16 (|v| < 2^-25, which round to
      0) are stored as +-2^-24, the smallest subnormal, so that epsilons stay non-zero
      (`values_underflowed`); inf, NaN and signed zeros are kept.
   Initializers that are also graph inputs may be overridden at run time: they are treated as
   graph inputs (case 5a), never converted.
5. Casts, at most one per tensor and direction, shared by all readers:
   a. a float32 tensor (graph input, output of a float32 node) read by a float16 input:
      `Cast(to=FLOAT16)` into `<name>_fp16` right after its producer (first, for graph inputs);
   b. a float16 output read as float32 (a float32 node, a pinned input, a subgraph, a graph
      output): `Cast(to=FLOAT)` from `<name>_fp16` back into `<name>`, right after the producer;
   c. shape readers (Shape, Size) and Cast nodes read whichever version the producer makes:
      they accept any dtype, so they never cause a Cast. (A Cast reading a constant counts as
      a float32 reader, so that it keeps casting the exact value.)
   Adjacent float16 nodes exchange float16 tensors directly.
6. value_info: the new float16 names get a copy of the original's entry with elem_type
   FLOAT16; constants converted in place get their entry's elem_type changed; entries of
   names that no longer exist are dropped.

ONNX Runtime CPU (1.32, x86-64; probed op by op) has float16 kernels only for data movement
(Reshape, Transpose, Concat, Slice, Gather, GatherElements, Split, Squeeze, Unsqueeze, Flatten,
Expand, Identity), Clip, Max, Min, IsNaN, IsInf, LayerNormalization and Cast. For every other op
of `FLOAT16_OPS` its InsertCastTransformer wraps the node in Casts and computes it in float32,
so a converted model loads and runs on CPU, with numbers slightly better than a GPU's (only
the stored tensors are rounded), and is only faster on a GPU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.engine.io import array_of, graph_protos, named_copy, node_subgraphs
from onnxshrink.engine.protos import compile_excludes, excluded_by
from onnxshrink.engine.shapes import default_opset, infer_shapes
from onnxshrink.errors import UsageError
from onnxshrink.quant.lossy import Plan, PlannedStage
from onnxshrink.quant.targets import TargetProfile

logger = logging.getLogger(__name__)

#: ops that may compute in float16 (case 1e): ONNX Runtime's CUDA EP has float16 kernels for all
FLOAT16_OPS = frozenset(
    {
        # compute
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Abs",
        "Neg",
        "Max",
        "Min",
        "Erf",
        "Gelu",
        # activations
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Clip",
        "Softmax",
        "LogSoftmax",
        # pooling, normalization, reductions that stay in range
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        # data movement
        "Concat",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Gather",
        "GatherElements",
        "Split",
        "Pad",
        "Resize",
        "Where",
        "Expand",
        "Tile",
        "Identity",
        "DepthToSpace",
        "SpaceToDepth",
        # float16 in, bool out
        "IsNaN",
        "IsInf",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        # output type in an attribute (case 2)
        "Cast",
        "ConstantOfShape",
    }
)
#: ops that read only the shape of their input, in either dtype (cases 1d, 5c)
SHAPE_READERS = frozenset({"Shape", "Size"})
#: inputs that stay float32 even when the node computes in float16 (case 2)
_KEEP_FLOAT32_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}
#: the largest finite float16 (case 4c)
FLOAT16_MAX = 65504.0
#: the smallest positive float16, a subnormal (case 4c)
FLOAT16_TINY = 2.0**-24

_FLOAT = TensorProto.FLOAT
_FLOAT16 = TensorProto.FLOAT16
_DEFAULT_DOMAINS = ("", "ai.onnx")
_VARIADIC = onnx.defs.OpSchema.FormalParameterOption.Variadic


@dataclass
class Float16Report:
    """What `convert_float16` did."""

    #: nodes that compute in float16, in graph order
    converted_nodes: list[str] = field(default_factory=list)
    #: Cast nodes inserted (case 5)
    casts_inserted: int = 0
    #: float32 constants stored as float16, copies included (case 4)
    initializers_converted: int = 0
    #: of those, separate float16 copies of constants that float32 readers still read (case 4b)
    initializers_copied: int = 0
    #: constant values beyond +-65504 clipped to it (case 4c)
    values_clipped: int = 0
    #: non-zero constant values below float16's range stored as +-2^-24 (case 4c)
    values_underflowed: int = 0


@dataclass(frozen=True)
class _NodePlan:
    """The inputs and outputs (by position) that a float16 node reads and writes in float16."""

    inputs: frozenset[int]
    outputs: frozenset[int]


def fp16_candidates(
    model: onnx.ModelProto, *, exclude: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """The nodes that may compute in float16, in graph order, and the others with a reason.

    Names are those of `onnxshrink.engine.io.named_copy` (unnamed nodes: `<op_type>_<index>`);
    the declined dict also lists nodes inside subgraphs. `exclude`: regexes, case 1b.
    """
    work = named_copy(model)
    plans, declined = _plan(work, compile_excludes(exclude), _main_dtypes(work))
    return list(plans), declined


def convert_float16(
    model: onnx.ModelProto, nodes: Collection[str]
) -> tuple[onnx.ModelProto, Float16Report]:
    """A new model in which `nodes` compute in float16; `model` is not modified.

    `nodes` must be candidates of `fp16_candidates` (a UsageError names the others). Graph inputs
    and outputs keep their names, dtypes and shapes; Casts go only where float32 and float16
    parts of the graph meet.
    """
    work = named_copy(model)
    dtypes = _main_dtypes(work)
    plans, declined = _plan(work, [], dtypes)
    selected = set(nodes)
    known = {n.name for g in graph_protos(work.graph) for n in g.node}
    unknown = sorted(selected - known)
    if unknown:
        raise UsageError(f"nodes not in the model: {_shown(unknown)}")
    refused = sorted(selected - set(plans))
    if refused:
        reasons = [f"{name} ({declined[name]})" for name in refused]
        raise UsageError(f"nodes that cannot compute in float16: {_shown(reasons)}")
    report = Float16Report(converted_nodes=[n.name for n in work.graph.node if n.name in selected])
    if selected:
        _Conversion(work, {name: plans[name] for name in selected}, dtypes, report).run()
    logger.info(
        "float16: %d nodes, %d Casts, %d constants converted (%d copies), %d values clipped",
        len(report.converted_nodes),
        report.casts_inserted,
        report.initializers_converted,
        report.initializers_copied,
        report.values_clipped,
    )
    return work, report


# ---------------------------------------------------------------------------------------------
# Planning (case 1, 2)
# ---------------------------------------------------------------------------------------------


def _plan(
    model: onnx.ModelProto, patterns: list[re.Pattern[str]], dtypes: dict[str, int]
) -> tuple[dict[str, _NodePlan], dict[str, str]]:
    opset = default_opset(model)
    plans: dict[str, _NodePlan] = {}
    declined: dict[str, str] = {}
    for node in model.graph.node:
        decision = _decide(node, opset, dtypes, patterns)
        if isinstance(decision, str):
            declined[node.name] = decision
        else:
            plans[node.name] = decision
        for sub in node_subgraphs(node):
            for graph in graph_protos(sub):
                for inner in graph.node:  # case 1a
                    declined[inner.name] = "inside a subgraph (only the main graph is converted)"
    return plans, declined


def _decide(
    node: onnx.NodeProto, opset: int, dtypes: dict[str, int], patterns: list[re.Pattern[str]]
) -> _NodePlan | str:
    """The node's plan, or why it stays float32."""
    excluded = excluded_by(node, patterns)  # case 1b
    if excluded:
        return excluded
    if node.domain not in _DEFAULT_DOMAINS:  # case 1c
        return f"not a default-domain op (domain {node.domain!r})"
    if node.op_type == "Constant":  # data, not compute
        return "a constant: stored in float16 where float16 nodes read it (case 4)"
    if node.op_type in SHAPE_READERS:  # case 1d
        return "reads only the shape of its input, in either dtype (never needs a Cast)"
    if node.op_type not in FLOAT16_OPS:  # case 1e
        return f"{node.op_type} is not in the float16 allow-list"
    if node.op_type == "Cast":  # case 2: the output type is the `to` attribute
        if _attr_int(node, "to") != _FLOAT:
            return "computes no float32 data"
        return _NodePlan(frozenset(), frozenset({0}))
    if node.op_type == "ConstantOfShape":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None and value.data_type != _FLOAT:
            return "computes no float32 data"
        return _NodePlan(frozenset(), frozenset({0}))
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return f"no schema for {node.op_type} at opset {opset}"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    keep = _KEEP_FLOAT32_INPUTS.get(node.op_type, frozenset())
    slots: list[tuple[str, int, str, onnx.defs.OpSchema.FormalParameter | None]] = [
        ("input", i, name, _formal(schema.inputs, i)) for i, name in enumerate(node.input)
    ] + [("output", i, name, _formal(schema.outputs, i)) for i, name in enumerate(node.output)]
    params: set[str] = set()
    for kind, index, name, formal in slots:
        if not name:
            continue
        dtype = dtypes.get(name, 0)
        if dtype == 0:  # case 1g
            return f"dtype of {name!r} is unknown"
        if dtype != _FLOAT or formal is None or formal.type_str not in allowed:
            continue  # not float32, or a fixed type (case 2)
        if kind == "input" and index in keep:
            continue
        if "tensor(float16)" not in allowed[formal.type_str]:  # case 1g
            return f"{node.op_type}-{schema.since_version} allows no float16 for {formal.type_str}"
        params.add(formal.type_str)
    if not params:  # case 1f
        return "computes no float32 data"

    def bound(kind: str, index: int) -> bool:
        formal = _formal(schema.inputs if kind == "input" else schema.outputs, index)
        return formal is not None and formal.type_str in params

    return _NodePlan(
        frozenset(
            i
            for i, name in enumerate(node.input)
            if name and i not in keep and dtypes.get(name) == _FLOAT and bound("input", i)
        ),
        frozenset(
            i
            for i, name in enumerate(node.output)
            if name and dtypes.get(name) == _FLOAT and bound("output", i)
        ),
    )


def _formal(
    params: Sequence[onnx.defs.OpSchema.FormalParameter], index: int
) -> onnx.defs.OpSchema.FormalParameter | None:
    """The schema parameter of the `index`-th actual input or output (variadic ones repeat)."""
    if index < len(params):
        return params[index]
    if params and params[-1].option == _VARIADIC:
        return params[-1]
    return None


def _main_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor that inference or the model itself knows."""
    inferred = infer_shapes(model)
    dtypes: dict[str, int] = {}
    graph = inferred.graph
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            dtypes[value.name] = value.type.tensor_type.elem_type
    for init in model.graph.initializer:
        dtypes[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            dtype = _constant_dtype(node)
            if dtype:
                dtypes[node.output[0]] = dtype
    return dtypes


# ---------------------------------------------------------------------------------------------
# Conversion (case 3-6)
# ---------------------------------------------------------------------------------------------


class _Conversion:
    """One conversion of `model` (a named copy, changed in place) for the float16 `plans`."""

    def __init__(
        self,
        model: onnx.ModelProto,
        plans: dict[str, _NodePlan],
        dtypes: dict[str, int],
        report: Float16Report,
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.plans = plans
        self.report = report
        self.dtypes = dtypes
        self.constants = self._constants({v.name for v in self.graph.input})
        self.used = _used_names(model)
        # readers as (node index, input position)
        self.half_readers: dict[str, list[tuple[int, int]]] = {}
        self.any_readers: dict[str, list[tuple[int, int]]] = {}
        self.needs_float: set[str] = set()
        self.half_outputs: dict[str, tuple[int, int]] = {}
        self.producers = {name: i for i, n in enumerate(self.graph.node) for name in n.output}
        #: float16 name -> the float32 name it stands for (case 3)
        self.renamed: dict[str, str] = {}
        self.first: list[onnx.NodeProto] = []
        self.after: dict[int, list[onnx.NodeProto]] = {}

    def run(self) -> None:
        self._collect()
        for name in list(dict.fromkeys([*self.half_outputs, *self.half_readers])):
            if name in self.half_outputs:
                self._half_output(name)
            elif name in self.constants:
                self._half_constant(name, self.constants[name])
            else:
                self._cast_to_half(name)
        for node in self.graph.node:
            if node.name in self.plans:
                self._convert_attributes(node)
        nodes = [*self.first]
        for index, node in enumerate(self.graph.node):
            nodes.append(node)
            nodes.extend(self.after.get(index, []))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._fix_value_info()

    def _collect(self) -> None:
        """Who reads each float32 tensor, and in which dtype (case 5)."""
        for index, node in enumerate(self.graph.node):
            plan = self.plans.get(node.name)
            for pos, name in enumerate(node.input):
                if not name or self.dtypes.get(name) != _FLOAT:
                    continue
                if plan is not None and pos in plan.inputs:
                    self.half_readers.setdefault(name, []).append((index, pos))
                elif _reads_any_dtype(node, pos) and not (
                    node.op_type == "Cast" and name in self.constants
                ):  # case 5c
                    self.any_readers.setdefault(name, []).append((index, pos))
                else:
                    self.needs_float.add(name)
            if plan is not None:
                for pos in plan.outputs:
                    self.half_outputs[node.output[pos]] = (index, pos)
            for sub in node_subgraphs(node):  # bodies read outer tensors by name, in float32
                for name in _names_read(sub):
                    if self.dtypes.get(name) == _FLOAT:
                        self.needs_float.add(name)
        for value in self.graph.output:
            if self.dtypes.get(value.name) == _FLOAT:
                self.needs_float.add(value.name)

    def _constants(self, graph_inputs: set[str]) -> dict[str, onnx.TensorProto | int]:
        """Float32 constants that may be converted ahead of time (case 4): the initializer, or
        the index of the Constant node."""
        found: dict[str, onnx.TensorProto | int] = {}
        for init in self.graph.initializer:
            if init.data_type == _FLOAT and init.name not in graph_inputs:
                found[init.name] = init
        for index, node in enumerate(self.graph.node):
            if (
                node.op_type == "Constant"
                and node.domain in _DEFAULT_DOMAINS
                and _constant_dtype(node) == _FLOAT
            ):
                found[node.output[0]] = index
        return found

    def _half_output(self, name: str) -> None:
        """A float16 node's output: rename it, Cast back to `name` where float32 is read."""
        index, pos = self.half_outputs[name]
        half = self._fresh(f"{name}_fp16")
        self.graph.node[index].output[pos] = half
        self._rewire(name, half, include_any=True)
        if name in self.needs_float:  # case 5b
            self._cast(half, name, _FLOAT, index)

    def _half_constant(self, name: str, source: onnx.TensorProto | int) -> None:
        """Case 4: convert in place (4a) or into a float16 copy (4b)."""
        if isinstance(source, onnx.TensorProto):
            node, array = None, array_of(source)
        else:
            node = self.graph.node[source]
            array = _constant_value(node)
        half_array = self._to_half(array)
        self.report.initializers_converted += 1
        if name not in self.needs_float:  # case 4a
            tensor = numpy_helper.from_array(half_array, name)
            if isinstance(source, onnx.TensorProto):
                tensor.doc_string = source.doc_string
                source.CopyFrom(tensor)
            elif node is not None:
                _set_constant_value(node, numpy_helper.from_array(half_array))
            return
        half = self._fresh(f"{name}_fp16")  # case 4b
        self.report.initializers_copied += 1
        self._rewire(name, half, include_any=False)
        if node is None:
            self.graph.initializer.append(numpy_helper.from_array(half_array, half))
        else:
            copy = helper.make_node(
                "Constant",
                [],
                [half],
                name=self._fresh(f"{node.name}_fp16"),
                value=numpy_helper.from_array(half_array),
            )
            self.after.setdefault(int(source), []).append(copy)

    def _cast_to_half(self, name: str) -> None:
        """Case 5a: one Cast to float16 after the producer, shared by all float16 readers."""
        half = self._fresh(f"{name}_fp16")
        self._rewire(name, half, include_any=False)
        self._cast(name, half, _FLOAT16, self.producers.get(name))

    def _cast(self, source: str, target: str, to: int, producer: int | None) -> None:
        suffix = "to_fp16" if to == _FLOAT16 else "to_fp32"
        node = helper.make_node(
            "Cast", [source], [target], name=self._fresh(f"{source}_{suffix}"), to=to
        )
        if producer is None:
            self.first.append(node)
        else:
            self.after.setdefault(producer, []).append(node)
        self.report.casts_inserted += 1

    def _rewire(self, name: str, half: str, include_any: bool) -> None:
        readers = list(self.half_readers.get(name, []))
        if include_any:
            readers += self.any_readers.get(name, [])
        for index, pos in readers:
            self.graph.node[index].input[pos] = half
        self.renamed[half] = name

    def _convert_attributes(self, node: onnx.NodeProto) -> None:
        """Case 2: the output dtype of Cast and ConstantOfShape lives in an attribute."""
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = _FLOAT16
        elif node.op_type == "ConstantOfShape":
            value = next((a for a in node.attribute if a.name == "value"), None)
            array = numpy_helper.to_array(value.t) if value is not None else np.zeros(1, np.float32)
            tensor = numpy_helper.from_array(self._to_half(array))
            if value is not None:
                value.t.CopyFrom(tensor)
            else:
                node.attribute.append(helper.make_attribute("value", tensor))

    def _to_half(self, array: np.ndarray) -> np.ndarray:
        half, clipped, underflowed = to_float16(array)
        self.report.values_clipped += clipped
        self.report.values_underflowed += underflowed
        return half

    def _fresh(self, hint: str) -> str:
        name, suffix = hint, 1
        while name in self.used:
            name = f"{hint}_{suffix}"
            suffix += 1
        self.used.add(name)
        return name

    def _fix_value_info(self) -> None:
        """Case 6."""
        graph = self.graph
        infos = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
        for half, name in self.renamed.items():
            if name in infos and half != name:
                entry = graph.value_info.add()
                entry.CopyFrom(infos[name])
                entry.name = half
                entry.type.tensor_type.elem_type = _FLOAT16
        for init in graph.initializer:
            if init.data_type == _FLOAT16:
                for entry in graph.value_info:
                    if entry.name == init.name:
                        entry.type.tensor_type.elem_type = _FLOAT16
        live = {name for node in graph.node for name in [*node.input, *node.output]}
        live |= {init.name for init in graph.initializer}
        kept = [v for v in graph.value_info if v.name in live]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def to_float16(array: np.ndarray) -> tuple[np.ndarray, int, int]:
    """`array` as float16, clipped to +-65504, non-zero values kept non-zero (case 4c).

    Returns the array and how many values were clipped and how many raised to +-2^-24.
    """
    values = np.asarray(array, dtype=np.float32)
    over = np.isfinite(values) & (np.abs(values) > FLOAT16_MAX)
    half = np.where(over, np.sign(values) * np.float32(FLOAT16_MAX), values).astype(np.float16)
    under = (half == 0) & (values != 0)
    half[under] = np.copysign(np.float16(FLOAT16_TINY), values[under]).astype(np.float16)
    return half, int(over.sum()), int(under.sum())


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _reads_any_dtype(node: onnx.NodeProto, pos: int) -> bool:
    """Shape readers and Cast accept any input dtype (case 5c)."""
    return (
        node.domain in _DEFAULT_DOMAINS
        and pos == 0
        and (node.op_type in SHAPE_READERS or node.op_type == "Cast")
    )


def _constant_dtype(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t.data_type
        if attr.name in ("value_float", "value_floats"):
            return _FLOAT
        if attr.name in ("value_int", "value_ints"):
            return TensorProto.INT64
    return 0


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), np.float32)
    raise ValueError(f"Constant {node.name!r} holds no float value")


def _set_constant_value(node: onnx.NodeProto, tensor: onnx.TensorProto) -> None:
    kept = [a for a in node.attribute if a.name not in ("value", "value_float", "value_floats")]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("value", tensor)])


def _attr_int(node: onnx.NodeProto, name: str) -> int | None:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return None


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read anywhere in `graph` and its own subgraphs."""
    return {name for g in graph_protos(graph) for node in g.node for name in node.input if name}


def _used_names(model: onnx.ModelProto) -> set[str]:
    used: set[str] = set()
    for graph in graph_protos(model.graph):
        used.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
        used.update(init.name for init in graph.initializer)
        for node in graph.node:
            used.add(node.name)
            used.update(node.input)
            used.update(node.output)
    return used


def _shown(items: Sequence[str]) -> str:
    return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")


class Float16Stage(PlannedStage):
    """`--quantize fp16` (module docstring): plan = `fp16_candidates`, materialization =
    `convert_float16`; the budget search and the checks are the engine's."""

    name = "fp16"
    summary = (
        "weights and compute in float16, inputs and outputs float32, nodes that lose accuracy "
        "kept float32 by the error budget"
    )
    precision = "float16"

    def plan(self, model: onnx.ModelProto, profile: TargetProfile, exclude: Sequence[str]) -> Plan:
        candidates, declined = fp16_candidates(model, exclude=exclude)
        return Plan(self.name, profile.name, dict.fromkeys(candidates, "float16"), declined)

    def materialize(self, model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, list[str]]:
        if not plan.applied:
            return model, []
        converted, report = convert_float16(model, plan.applied)
        notes = []
        if report.values_clipped:
            notes.append(
                f"fp16: {report.values_clipped} weight value(s) beyond +-65504 clipped to the "
                "float16 range"
            )
        return converted, notes


STAGE = Float16Stage()
