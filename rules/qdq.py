"""Static int8 quantization: insert QuantizeLinear/DequantizeLinear (QDQ) around compute ops.

The result is a QDQ model in the standard ai.onnx domain: a runtime that knows int8 kernels
(ONNX Runtime's QDQ fusion into QLinearConv/QLinearMatMul/QGemm, TensorRT) fuses each
`DQ -> op -> Q` group into one int8 kernel; any other runtime simply runs the float op on
dequantized values. Ranges of the activations come from calibration (`collect_ranges` in
`onnxshrink.quant.calibration`); this module takes them as a plain dict `tensor -> (lo, hi)`.

Algebra. Quantize `q = clamp(round(x / s) + z, qmin, qmax)`, dequantize `x' = (q - z) * s`.

1. Which nodes. Conv, ConvTranspose (group 1), Gemm and MatMul whose weight (input 1) is a
   float32 initializer of the main graph and whose activation (input 0) is not a constant.
   Kept float, each with its reason in the report:
   a. depthwise Conv: group > 1 and one input channel per group (`W.shape[1] == 1`), where
      the target profile says why (`TargetProfile.depthwise_float_reason`: on ort-cpu, ORT's
      int8 kernels do not beat its float ones there);
   b. tiny weights: fewer than `MIN_WEIGHT_ELEMENTS` (64) elements; the Q/DQ conversion of the
      activations costs about what the int8 arithmetic saves;
   c. MatMul whose B is not a constant initializer (activation x activation), or whose B is
      not 2-D;
   d. nodes inside subgraphs (If/Loop/Scan bodies): only the main graph is quantized;
   e. nodes matched by `exclude` or left out of `nodes`;
   f. nodes whose input activation has no calibrated range.
2. Weights: int8 symmetric per output channel, `s_c = max|W_c| / 127`, `z = 0`, values in
   [-127, 127]; a channel of zeros gets `s_c = 1` (any scale represents it exactly). The
   channel axis is 0 for Conv (`[C_out, C_in/g, k...]`), 1 for ConvTranspose
   (`[C_in, C_out/g, k...]`), 1 for MatMul (`B[K, N]`), and for Gemm 0 when transB = 1
   (`B[N, K]`) else 1. Stored as an int8 initializer read by `DequantizeLinear(axis=...)`;
   per-channel DequantizeLinear needs opset 13, so a model below 13 is first converted with
   `onnxshrink.engine.shapes.convert_opset` (the report says so).
3. Bias (Conv, ConvTranspose, and Gemm's C when it is 1-D of length N): int32 with
   `s_b,c = s_x * s_w,c`, `z = 0`, read by `DequantizeLinear(axis=0)`, so that the int32
   accumulator adds it directly. Only when the activation input is quantized. A channel whose
   weights are all near zero but whose bias is not would need an int32 bias past its range
   (`|b| / (s_x s_w)`): its weight scale is raised to `|b| / (s_x 2^30)` (its weights then
   round to about 0, as they nearly are), with a note; a bias that still overflows stays
   float (with a note), which keeps ORT from fusing that node.
4. Activations, per tensor, from the range `(lo, hi)`, widened to include 0 so that zero
   (padding) is exact:
   a. `ort-cpu`: uint8 asymmetric, `s = (hi - lo) / 255`, `z = clamp(round(-lo / s), 0, 255)`;
   b. `tensorrt`: int8 symmetric, `s = max(|lo|, |hi|) / 127`, `z = 0`;
   an empty range (lo == hi == 0) gets `s = 1`.
5. Placement. One Q -> DQ pair per tensor, shared by all its quantized readers.
   a. The activation input of every quantized node reads DQ's output; readers that stay
      float keep reading the float tensor.
   b. `ort-cpu` also quantizes each quantized Conv/ConvTranspose/Gemm's output (the target
      profile's `output_qdq_ops`), and a MatMul's only where ORT would otherwise turn it into a
      float Gemm (`_output_qdq`: a static input shape and a bias Add after it;
      `onnxshrink.quant.targets`, 1), when its range is known, so that ORT can fuse `DQ -> Conv -> Q` into QLinearConv and the next layer reads
      int8 directly.
      Every reader of that output then reads DQ's output (a float reader beside Q would stop
      the fusion). `tensorrt` places Q/DQ on inputs only (TensorRT propagates them).
   c. Graph inputs and outputs keep their names and stay float: an output that is a graph
      output keeps its float value for the graph; only its node readers go through Q/DQ.
   d. `tensorrt` also quantizes, as TensorRT's Q/DQ placement guidance asks, the residual input
      of an Add that joins a quantized layer's output with another activation (the Add then
      fuses into that layer's int8 epilogue), and the input of MaxPool/AveragePool/
      GlobalAveragePool/GlobalMaxPool next to a quantized layer (the pooling runs in int8).
      Only that reader moves to the DQ; pure data-movement ops get no Q/DQ.
   Q/DQ nodes go right after the tensor's producer (or first, for graph inputs) and weight
   DQs right before their reader, so the node list stays topologically sorted.
6. Weight-only int8 (default for `ort-cpu`). A node kept float for a reason that is not about
   its weight (left out of `nodes`, e.g. kept float by sensitivity analysis; no calibrated
   range) still stores its weight as per-channel int8 (case 2) read by a DequantizeLinear,
   while its activation stays float: the product runs in float, and the file holds a quarter
   of those bytes. The weight's rounding error is the only numerical change; callers that
   bound the error (the budget) measure it. The DQ runs on every inference (ONNX Runtime does
   not fold it): one pass over the weight, against the product's one pass per output row.
   For MatMul and Gemm that is all it costs. A Conv whose weight is not a constant also loses
   ORT's NCHWc kernels, its fastest float convolutions (measured on ppocr-v4-rec: two 480x480
   1x1 convs weight-only made the model 5% slower and 0.13x of fp32 smaller), so a Conv gets
   it only when its weight holds at least its target profile's `conv_weight_only_share` (1% on
   `ort-cpu`) of the model's float weights, where the bytes matter. Off for `tensorrt`, which expects Q/DQ on the activation
   as well.
7. Bias correction (with `input_means`, after Nagel et al., "Data-Free Quantization", 2019).
   Rounding the weight to W' = W + dW shifts the node's output by dW x; its expectation
   dW E[x] is known from the per-channel mean mu of the input on calibration data. The bias
   absorbs it: Conv (group 1): `b'_o = b_o - sum_{c,k} dW[o, c, k] mu_c` (every kernel tap sees
   the channel mean; zero padding makes this approximate at the borders); Gemm (transA = 0):
   `C' = C - (alpha / beta) (mu dB)` (`dB mu` when transB). A node without bias gets one. It
   applies to quantized and weight-only nodes alike; MatMul and ConvTranspose have no bias
   input and are left as they are. Measured on ppocr-v4-rec with every weight rounded to int8
   and activations float: held-out CER 3.90% without, 3.12% with (fp32 2.81%).
8. `ort-cuda`. ONNX Runtime's CUDA EP has no int8 convolution or GEMM kernels for QDQ models (its
   FAQ: the CUDA build has QuantizeLinear, DequantizeLinear and MatMulInteger): a
   DQ -> Conv -> Q group runs as float Conv between (de)quantizations, slower than fp32. So
   for this target every layer computes in float and every weight that can be (any Conv,
   depthwise too, ConvTranspose, Gemm, MatMul) is stored int8 and dequantized on the GPU
   (case 6, with bias correction): a smaller file at float speed. No activation is quantized
   (`activation_tensors` is empty). For int8 compute on NVIDIA GPUs, use `tensorrt`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.engine.io import (
    SESSION_FILE_BYTES,
    NameAllocator,
    array_of,
    graph_protos,
    model_bytes,
    name_nodes,
    named,
    named_copy,
    node_subgraphs,
    skeleton,
)
from onnxshrink.engine.protos import compile_excludes, drop_initializers, excluded_by
from onnxshrink.engine.shapes import convert_opset, default_opset, infer_shapes
from onnxshrink.errors import UsageError
from onnxshrink.quant.schemes import INT8_WEIGHT
from onnxshrink.quant.targets import PROFILES, TargetProfile, target_profile
from onnxshrink.quant.targets import TARGETS as PROFILE_NAMES

logger = logging.getLogger(__name__)

#: quantization targets (onnxshrink.quant.targets): activation scheme and where Q/DQ go (case 4, 5)
TARGETS = PROFILE_NAMES
#: ops quantized with a constant weight at input 1 (case 1)
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: weights with fewer elements stay float (case 1b)
MIN_WEIGHT_ELEMENTS = 64
#: ops whose weight may be stored int8 while they compute in float (case 6)
WEIGHT_ONLY_OPS = ("MatMul", "Gemm", "Conv")
#: per-channel DequantizeLinear (its `axis` attribute) needs this opset (case 2)
PER_CHANNEL_OPSET = 13

_INT32_MAX = np.iinfo(np.int32).max
#: the int32 bias may use half its range, leaving room for bias correction (case 3)
_BIAS_HEADROOM = 2.0**30
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class QuantCandidate:
    """One Conv/ConvTranspose/Gemm/MatMul node and whether it can be quantized.

    `reason` is None when the node is quantized; otherwise why it stays float. `activation`
    and `output` are the tensors that need calibrated ranges.
    """

    name: str
    op: str
    activation: str | None
    weight: str | None
    output: str | None
    reason: str | None = None
    #: kept float, but its weight can still be stored int8 and dequantized (case 6)
    weight_only_ok: bool = False

    @property
    def quantizable(self) -> bool:
        return self.reason is None

    def tensors(self) -> tuple[str, str]:
        """(activation, weight) of a candidate that is quantized or stores its weight int8.

        Both are set there: `quantizable_nodes` keeps a node with a missing input float.
        """
        assert self.activation is not None and self.weight is not None, self.name
        return self.activation, self.weight


@dataclass
class QuantizeReport:
    """What `quantize_qdq` did: quantized nodes, nodes kept float and why, opset change."""

    target: str
    quantized: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)
    opset_before: int = 0
    opset_after: int = 0
    quantize_linear: int = 0
    dequantize_linear: int = 0
    quantized_tensors: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    bias_corrected: list[str] = field(default_factory=list)
    tensorrt_joins: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def opset_changed(self) -> bool:
        return self.opset_before != self.opset_after


@dataclass(frozen=True)
class _ActivationParams:
    scale: np.float32
    zero_point: np.ndarray  # 0-d uint8 (ort-cpu) or int8 (tensorrt)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def quantizable_nodes(
    model: onnx.ModelProto,
    target: str = "ort-cpu",
    *,
    exclude: Sequence[str] = (),
    nodes: set[str] | None = None,
    min_weight_elements: int = MIN_WEIGHT_ELEMENTS,
) -> list[QuantCandidate]:
    """Every Conv/ConvTranspose/Gemm/MatMul of the model (subgraphs too), quantizable or not.

    Unnamed nodes are listed as `<op>_<index>` (their position in their graph), the name
    `quantize_qdq` gives them in its output. Ranges are not consulted here (case 1f).
    """
    profile = target_profile(target)
    patterns = compile_excludes(exclude)
    work = named(model)  # read only
    _check_selection(work, nodes)
    return _candidates(work, patterns, nodes, min_weight_elements, profile)


def activation_tensors(
    model: onnx.ModelProto,
    target: str = "ort-cpu",
    *,
    exclude: Sequence[str] = (),
    nodes: set[str] | None = None,
    min_weight_elements: int = MIN_WEIGHT_ELEMENTS,
) -> list[str]:
    """The tensors that calibration must give ranges for, in graph order, without repeats.

    Inputs of quantizable nodes, for `ort-cpu` also their outputs (case 5b), for `tensorrt` also
    the residual and pooling inputs of case 5d.
    """
    names: dict[str, None] = {}
    profile = target_profile(target)
    candidates = quantizable_nodes(
        model, target, exclude=exclude, nodes=nodes, min_weight_elements=min_weight_elements
    )
    output_pairs = _output_qdq(model.graph, candidates, profile)
    for cand in candidates:
        if not cand.quantizable:
            continue
        activation, _ = cand.tensors()
        names[activation] = None
        if cand.output and cand.name in output_pairs:
            names[cand.output] = None
    if profile.residual_joins:  # case 5d, with every quantizable node counted as quantized
        work = named(model)  # read only
        outputs = {c.output for c in candidates if c.quantizable and c.output}
        inputs = {c.activation for c in candidates if c.quantizable and c.activation}
        for _, _, tensor in _tensorrt_joins(work.graph, outputs, inputs):
            names[tensor] = None
    return list(names)


def bias_correction_axes(
    model: onnx.ModelProto, target: str = "ort-cpu", *, exclude: Sequence[str] = ()
) -> dict[str, int]:
    """Activation tensor -> channel axis, for the nodes whose bias can absorb case 7's shift.

    Conv with group 1 (axis 1) and Gemm without transA (axis -1), quantizable or storable as
    weight-only; what `calibration.collect_statistics(mean_axes=...)` should average.
    """
    axes: dict[str, int] = {}
    work = named(model)  # read only
    groups = {n.name: int(_attr(n, "group", 1)) for n in work.graph.node}
    trans_a = {n.name: int(_attr(n, "transA", 0)) for n in work.graph.node}
    for cand in quantizable_nodes(work, target, exclude=exclude):
        if not (cand.quantizable or cand.weight_only_ok) or cand.activation is None:
            continue
        if cand.op == "Conv" and groups.get(cand.name) == 1:
            axes.setdefault(cand.activation, 1)
        elif cand.op == "Gemm" and not trans_a.get(cand.name):
            axes.setdefault(cand.activation, -1)
    return axes


def prepare_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with every node named and opset >= 13 (case 2), and its old opset.

    A large model (over `SESSION_FILE_BYTES`) is named and given shapes in place instead.

    What `quantize_qdq` does to every model it is given, done once: a caller that builds many
    candidates from one model (the budget search) prepares it first, so that no candidate
    pays for an opset conversion. The conversion happens only when a node could be quantized
    or store int8 weights (it changes nothing otherwise).
    """
    # value_info, for case 5b's static shapes; a large model is named in place, not copied
    large = model_bytes(model) > SESSION_FILE_BYTES
    work = infer_shapes(name_nodes(model) if large else named_copy(model))
    before = default_opset(work)
    if before < PER_CHANNEL_OPSET and any(
        c.quantizable or c.weight_only_ok
        for profile in PROFILES.values()
        for c in _candidates(work, [], None, 0, profile)
    ):
        work = convert_opset(work, PER_CHANNEL_OPSET)
    return work, before


def quantize_qdq(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    *,
    target: str = "ort-cpu",
    exclude: Sequence[str] = (),
    nodes: set[str] | None = None,
    min_weight_elements: int = MIN_WEIGHT_ELEMENTS,
    weight_only: bool | Collection[str] | None = None,
    input_means: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, QuantizeReport]:
    """Quantize a float model to QDQ int8 with calibrated activation ranges; `model` is kept.

    - `ranges`: tensor name -> (lo, hi), as `onnxshrink.quant.calibration.collect_ranges` returns;
      tensors listed by `activation_tensors` should be present (a quantizable node whose input
      has no range stays float; an output without one gets no output Q/DQ).
    - `exclude`: regexes; a node stays float when one is found in its name (`re.search`) or
      matches its op type exactly (`re.fullmatch`): `Conv` keeps every Conv, no ConvTranspose.
    - `nodes`: when given, only these node names are quantized (UsageError for unknown names).
    - `weight_only`: store the weights of nodes kept float as int8 too (case 6): True for every
      such node that can be, a collection for those names only, False for none; default True
      for `ort-cpu` and `ort-cuda`, False for `tensorrt`. Nodes matched by `exclude` stay
      entirely float.
    - `input_means`: activation tensor -> its per-channel mean on calibration data
      (`calibration.collect_statistics` with `bias_correction_axes`): the biases of the nodes
      reading it absorb the mean shift that weight rounding causes (case 7).
    The model is converted to opset 13 first when it is older (case 2).
    """
    profile = target_profile(target)
    patterns = compile_excludes(exclude)
    params = _activation_params(ranges, profile)
    # A large model already at opset 13 (as `prepare_model` leaves it) is not copied whole:
    # the new model starts as a skeleton, quantized weights come from `model`, and only the
    # float weights that stay are copied in at the end (`_fill_stubs`). Each budget candidate
    # would otherwise hold a copy of every float weight it replaces.
    source = None
    stubs: set[str] = set()  # the skeleton's initializers without their bytes
    if model_bytes(model) > SESSION_FILE_BYTES and default_opset(model) >= PER_CHANNEL_OPSET:
        source = named(model)
        work = skeleton(source, lambda _tensor, stub: stubs.add(stub.name))
    else:
        work = named_copy(model)
    _check_selection(work, nodes)
    report = QuantizeReport(target=target, opset_before=default_opset(work))

    candidates = _with_ranges(
        _candidates(work, patterns, nodes, min_weight_elements, profile), params
    )
    wants_dq = any(
        c.quantizable or (weight_only is not False and c.weight_only_ok) for c in candidates
    )
    if wants_dq and report.opset_before < PER_CHANNEL_OPSET:
        work = convert_opset(work, PER_CHANNEL_OPSET)
        report.notes.append(
            f"converted from opset {report.opset_before} to {PER_CHANNEL_OPSET}: per-channel "
            "DequantizeLinear needs its axis attribute"
        )
        # node names survive the conversion (they were given before it), so the decisions
        # made above still name the same nodes; recompute them on the converted graph
        candidates = _with_ranges(
            _candidates(work, patterns, nodes, min_weight_elements, profile), params
        )
    report.opset_after = default_opset(work)

    if weight_only is None:
        weight_only = profile.weight_only
    storable = [c for c in candidates if not c.quantizable and c.weight_only_ok]
    if isinstance(weight_only, bool):
        weights_only = storable if weight_only else []
    else:
        chosen = set(weight_only)
        weights_only = [c for c in storable if c.name in chosen]
    for cand in candidates:
        if cand.reason is None:  # quantizable
            report.quantized.append(cand.name)
        else:
            report.kept_float[cand.name] = cand.reason
    report.weight_only = [c.name for c in weights_only]
    if report.quantized or weights_only:
        quantized = [c for c in candidates if c.quantizable]
        _insert_qdq(
            work, quantized, weights_only, params, profile, report, input_means or {}, source
        )
    if source is not None:
        _fill_stubs(work, source, stubs)
    logger.info(
        "quantized %d node(s), kept %d float, inserted %d Q and %d DQ",
        len(report.quantized),
        len(report.kept_float),
        report.quantize_linear,
        report.dequantize_linear,
    )
    return work, report


# ---------------------------------------------------------------------------------------------
# Choosing nodes (case 1)
# ---------------------------------------------------------------------------------------------


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _check_selection(model: onnx.ModelProto, nodes: set[str] | None) -> None:
    if nodes is None:
        return
    known = {n.name for g in graph_protos(model.graph) for n in g.node}
    unknown = sorted(set(nodes) - known)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UsageError(f"nodes not in the model: {shown}")


def _output_qdq(
    graph: onnx.GraphProto, candidates: Sequence[QuantCandidate], profile: TargetProfile
) -> set[str]:
    """Case 5b: the quantizable nodes whose output gets a Q/DQ pair on this target.

    The profile's `output_qdq_ops`, and with `static_matmul_output_qdq` a MatMul whose input
    has a fully known shape and whose output is read by one Add of a constant: ONNX Runtime
    fuses that pair into a float Gemm (MatMulAddFusion) before its QDQ fusions see the MatMul,
    so without an output Q the layer would run in float on a dequantized weight; with one it
    is a QLinearMatMul. With a dynamic shape the pair stays, and ORT computes DQ -> MatMul as
    MatMulIntegerToFloat, more accurately than through an output Q.
    """
    chosen = {c.name for c in candidates if c.quantizable and c.op in profile.output_qdq_ops}
    if not profile.static_matmul_output_qdq:
        return chosen
    shapes = {v.name: v for v in (*graph.input, *graph.value_info)}
    constants = {t.name for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for cand in candidates:
        if not (cand.quantizable and cand.op == "MatMul" and cand.activation and cand.output):
            continue
        info = shapes.get(cand.activation)
        dims = info.type.tensor_type.shape.dim if info is not None else []
        static = (
            info is not None
            and info.type.tensor_type.HasField("shape")
            and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims)
        )
        after = readers.get(cand.output, [])
        bias_add = (
            len(after) == 1
            and after[0].op_type == "Add"
            and any(i in constants for i in after[0].input if i != cand.output)
        )
        if static and bias_add:
            chosen.add(cand.name)
    return chosen


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the node's weight (case 2)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 1  # ConvTranspose [C_in, C_out/g, k...], MatMul B[K, N]


def _candidates(
    model: onnx.ModelProto,
    patterns: Sequence[re.Pattern[str]],
    selected: set[str] | None,
    min_weight_elements: int,
    profile: TargetProfile,
) -> list[QuantCandidate]:
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    overridable = {v.name for v in graph.input}  # an initializer that is also an input
    out: list[QuantCandidate] = []
    float_weights = sum(
        int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )

    def weight_only_ok(op: str, size: int) -> bool:  # case 6
        if op not in WEIGHT_ONLY_OPS:
            return False
        # the Conv share is about ORT CPU's NCHWc kernels; cuDNN has no such layout
        share = profile.conv_weight_only_share
        return op != "Conv" or share is None or size >= share * float_weights

    def decide(node: onnx.NodeProto, in_subgraph: bool) -> QuantCandidate:
        activation = node.input[0] if node.input and node.input[0] else None
        weight = node.input[1] if len(node.input) > 1 and node.input[1] else None
        output = node.output[0] if node.output and node.output[0] else None

        def keep(reason: str, weight_only_ok: bool = False) -> QuantCandidate:
            return QuantCandidate(
                node.name, node.op_type, activation, weight, output, reason, weight_only_ok
            )

        if in_subgraph:  # case 1d
            return keep("inside a subgraph (only the main graph is quantized)")
        excluded = excluded_by(node, patterns)
        if excluded:
            return keep(excluded)
        if activation is None or weight is None:
            return keep("missing input")
        if activation in initializers:
            return keep("activation input is a constant")
        if weight not in initializers or weight in overridable:  # case 1c
            what = "B" if node.op_type == "MatMul" else "weight"
            return keep(f"{what} is not a constant initializer")
        proto = initializers[weight]
        if proto.data_type != onnx.TensorProto.FLOAT:
            return keep("weight is not float32")
        dims = list(proto.dims)
        size = int(np.prod(dims)) if dims else 1
        if node.op_type in ("MatMul", "Gemm") and len(dims) != 2:
            return keep(f"weight has rank {len(dims)}, not 2")
        if node.op_type in ("Conv", "ConvTranspose") and len(dims) < 3:
            return keep(f"weight has rank {len(dims)}")
        if size < min_weight_elements:  # case 1b
            return keep(f"weight too small ({size} < {min_weight_elements} elements)")
        # from here on the weight could be stored int8 with float compute (case 6)
        storable = weight_only_ok(node.op_type, size)
        if selected is not None and node.name not in selected:  # case 1e
            return keep("not in the selected nodes", storable)
        if profile.float_compute_reason:  # case 8
            return keep(profile.float_compute_reason, storable)
        group = int(_attr(node, "group", 1))
        depthwise = node.op_type == "Conv" and group > 1 and dims[1] == 1
        if depthwise and profile.depthwise_float_reason:  # case 1a
            return keep(profile.depthwise_float_reason)
        if node.op_type == "ConvTranspose" and group != 1:
            return keep("grouped ConvTranspose (per-channel axis 1 does not span C_out)")
        return QuantCandidate(node.name, node.op_type, activation, weight, output, None, storable)

    def walk(g: onnx.GraphProto, in_subgraph: bool) -> None:
        for node in g.node:
            if node.op_type in QUANTIZABLE_OPS and _is_default_domain(node):
                out.append(decide(node, in_subgraph))
            for sub in node_subgraphs(node):
                walk(sub, True)

    walk(graph, False)
    return out


#: pooling ops TensorRT runs in int8 when their input is quantized (case 5d)
_TENSORRT_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def _tensorrt_joins(
    graph: onnx.GraphProto, quantized_outputs: set[str], quantized_inputs: set[str]
) -> list[tuple[str, int, str]]:
    """Case 5d: (node name, input index, tensor) that get Q/DQ for TensorRT's int8 fusions.

    - Add of two activations, one of them a quantized node's output: the other input (the
      residual branch), so the Add fuses into that layer's int8 epilogue.
    - MaxPool/AveragePool/GlobalAveragePool/GlobalMaxPool whose input comes from a quantized
      node, or whose output feeds one: its input, so the pooling runs in int8.
    """
    initializers = {t.name for t in graph.initializer}
    constants = initializers | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    joins: list[tuple[str, int, str]] = []
    for node in graph.node:
        if not _is_default_domain(node):
            continue
        if node.op_type == "Add" and len(node.input) == 2:
            a, b = node.input
            if not a or not b or a in constants or b in constants or a == b:
                continue
            if a in quantized_outputs and b not in quantized_outputs:
                joins.append((node.name, 1, b))
            elif b in quantized_outputs and a not in quantized_outputs:
                joins.append((node.name, 0, a))
        elif node.op_type in _TENSORRT_POOLS and node.input and node.input[0]:
            x = node.input[0]
            if x in constants:
                continue
            if x in quantized_outputs or (node.output and node.output[0] in quantized_inputs):
                joins.append((node.name, 0, x))
    return joins


def _with_ranges(
    candidates: list[QuantCandidate], params: dict[str, _ActivationParams]
) -> list[QuantCandidate]:
    """Case 1f: a node whose activation has no range stays float."""
    result = []
    for cand in candidates:
        if cand.quantizable and cand.activation not in params:
            cand = QuantCandidate(
                cand.name,
                cand.op,
                cand.activation,
                cand.weight,
                cand.output,
                f"no calibrated range for input {cand.activation!r}",
                cand.weight_only_ok,
            )
        result.append(cand)
    return result


# ---------------------------------------------------------------------------------------------
# Quantization parameters (cases 2-4)
# ---------------------------------------------------------------------------------------------


def _activation_params(
    ranges: dict[str, tuple[float, float]], profile: TargetProfile
) -> dict[str, _ActivationParams]:
    """Case 4: per-tensor scale and zero point from each (lo, hi)."""
    params = {}
    for name, value in ranges.items():
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise UsageError(f"range for {name!r} must be (lo, hi), got {value!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
            raise UsageError(f"range for {name!r} must be finite with lo <= hi, got {value!r}")
        scheme = profile.activation  # the scheme's qparams: one place for the algebra
        scale, zero = scheme.qparams(lo, hi)
        params[name] = _ActivationParams(
            np.float32(scale), np.array(zero, dtype=scheme.numpy_dtype)
        )
    return params


def quantize_weight(
    w: np.ndarray, axis: int, floor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 along `axis`: (int8 values, float32 scales), case 2.

    `floor` (per channel) raises scales below it, so that the int32 bias fits (case 3).
    """
    q, scale, _ = INT8_WEIGHT.quantize_array(w, axis, floor)
    return q, scale


def quantize_bias(b: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """int32 bias with the given per-channel scale (case 3); None when it would overflow."""
    q = np.rint(b.astype(np.float64) / scale.astype(np.float64))
    if not np.all(np.abs(q) <= _INT32_MAX):
        return None
    return q.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Graph edit (case 5)
# ---------------------------------------------------------------------------------------------


def _insert_qdq(
    model: onnx.ModelProto,
    quantized: list[QuantCandidate],
    weights_only: list[QuantCandidate],
    params: dict[str, _ActivationParams],
    profile: TargetProfile,
    report: QuantizeReport,
    input_means: Mapping[str, np.ndarray],
    source: onnx.ModelProto | None = None,
) -> None:
    graph = model.graph
    names = NameAllocator(model)
    # weights are read from `source` when `model` is its skeleton (see quantize_qdq)
    initializers = {t.name: t for t in (source or model).graph.initializer}
    by_name = {c.name: c for c in quantized}
    weight_only_names = {c.name: c for c in weights_only}
    new_inits: list[onnx.TensorProto] = []
    replaced = (
        {c.tensors()[1] for c in quantized}
        | {c.tensors()[1] for c in weights_only}
        | {
            n.input[2]
            for n in graph.node
            if (n.name in by_name or n.name in weight_only_names) and len(n.input) > 2
        }
    )

    # Case 5: which tensors get a Q/DQ pair, and whose readers move to it.
    redirect_all: set[str] = set()  # 5b: outputs of quantized nodes
    pairs: dict[str, None] = {}
    for cand in quantized:
        pairs[cand.tensors()[0]] = None
    output_pairs = _output_qdq(graph, quantized, profile)
    if output_pairs:
        readers_of: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                readers_of[name] = readers_of.get(name, 0) + 1
        for cand in quantized:
            if cand.name not in output_pairs:
                continue
            if cand.output in params and readers_of.get(cand.output, 0) > 0:
                pairs[cand.output] = None
                redirect_all.add(cand.output)
    redirect_at: dict[tuple[str, int], str] = {}  # 5d: one reader's input moves to the DQ
    if profile.residual_joins:
        outputs = {c.output for c in quantized if c.output}
        inputs = {c.tensors()[0] for c in quantized}
        for node_name, index, tensor in _tensorrt_joins(graph, outputs, inputs):
            if tensor in params:
                pairs[tensor] = None
                redirect_at[(node_name, index)] = tensor
                report.tensorrt_joins.append(node_name)

    def const(hint: str, value: np.ndarray) -> str:
        name = names.new(hint)
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    dq_of: dict[str, str] = {}  # float tensor -> its DQ output
    pair_nodes: dict[str, list[onnx.NodeProto]] = {}
    for tensor in pairs:
        p = params[tensor]
        scale = const(f"{tensor}_scale", np.array(p.scale, dtype=np.float32))
        zero = const(f"{tensor}_zero_point", p.zero_point)
        q_out, dq_out = names.new(f"{tensor}_quantized"), names.new(f"{tensor}_dequantized")
        pair_nodes[tensor] = [
            helper.make_node(
                "QuantizeLinear",
                [tensor, scale, zero],
                [q_out],
                name=names.new(f"{tensor}_QuantizeLinear"),
            ),
            helper.make_node(
                "DequantizeLinear",
                [q_out, scale, zero],
                [dq_out],
                name=names.new(f"{tensor}_DequantizeLinear"),
            ),
        ]
        dq_of[tensor] = dq_out
        report.quantized_tensors.append(tensor)
        report.quantize_linear += 1
        report.dequantize_linear += 1

    weight_dq: dict[tuple, tuple[str, np.ndarray, onnx.NodeProto]] = {}
    # (int8 weight, scale, its axis) of each rounded weight: the rounding error (dequantized -
    # float) is computed when case 7 asks for it, not kept for every weight (float64: twice
    # the model's weights in memory)
    weight_rounding: dict[tuple, tuple[np.ndarray, np.ndarray, int]] = {}
    bias_dq: dict[tuple[str, bytes], tuple[str, onnx.NodeProto]] = {}

    cand_of = {c.name: c for c in quantized}
    rounded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def natural_rounding(cand: QuantCandidate, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """quantize_weight of the node's weight without a floor, computed once per weight."""
        _, weight = cand.tensors()
        key = (weight, axis)
        if key not in rounded:
            rounded[key] = quantize_weight(array_of(initializers[weight]), axis)
        return rounded[key]

    def bias_floor(node: onnx.NodeProto, x_scale: np.float32, axis: int) -> np.ndarray | None:
        """Case 3: the least weight scale per channel that keeps the int32 bias in range, where
        the natural scale is below it (a channel of near-zero weights with a real bias);
        None when no channel needs it."""
        if len(node.input) < 3 or not node.input[2] or node.input[2] not in initializers:
            return None
        b = array_of(initializers[node.input[2]]).astype(np.float64)
        channels = int(initializers[node.input[1]].dims[axis])
        if b.shape != (channels,):
            return None
        floor = np.abs(b) / (float(x_scale) * _BIAS_HEADROOM)
        natural = natural_rounding(cand_of[node.name], axis)[1]
        if not np.any(natural < floor):
            return None
        report.notes.append(
            f"{node.name}: weight scale raised on {int(np.sum(natural < floor))} channel(s) of "
            "near-zero weights so that the int32 bias fits"
        )
        return floor.astype(np.float32)

    def weight_node(
        cand: QuantCandidate, axis: int, floor: np.ndarray | None = None
    ) -> tuple[str, np.ndarray, onnx.NodeProto]:
        key = (cand.weight, axis) if floor is None else (cand.weight, axis, floor.tobytes())
        if key not in weight_dq:
            q, scale = (
                natural_rounding(cand, axis)
                if floor is None
                else quantize_weight(array_of(initializers[cand.weight]), axis, floor)
            )
            q_name = const(f"{cand.weight}_quantized", q)
            s_name = const(f"{cand.weight}_scale", scale)
            z_name = const(f"{cand.weight}_zero_point", np.zeros_like(scale, dtype=np.int8))
            out = names.new(f"{cand.weight}_dequantized")
            node = helper.make_node(
                "DequantizeLinear",
                [q_name, s_name, z_name],
                [out],
                name=names.new(f"{cand.weight}_DequantizeLinear"),
                axis=axis,
            )
            weight_dq[key] = (out, scale, node)
            weight_rounding[key] = (q, scale, axis)
            report.dequantize_linear += 1
        return weight_dq[key]

    def corrected_bias(
        node: onnx.NodeProto, cand: QuantCandidate, axis: int, key: tuple
    ) -> np.ndarray | None:
        """Case 7: the node's bias minus the mean output shift of its rounded weight, or None.

        `key` names the rounded weight in `weight_rounding` (the one `weight_node` made)."""
        mean = input_means.get(cand.tensors()[0])
        if mean is None:
            return None
        mean = np.asarray(mean, dtype=np.float64)
        q, scale, q_axis = weight_rounding[key]
        shape = [1] * q.ndim
        shape[q_axis] = -1
        w = array_of(initializers[cand.weight])
        error = q.astype(np.float64) * scale.reshape(shape) - w
        if node.op_type == "Conv":
            if int(_attr(node, "group", 1)) != 1 or error.shape[1] != mean.shape[0]:
                return None
            shift = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2) @ mean
        elif node.op_type == "Gemm":
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            if _attr(node, "transA", 0) or beta == 0.0:
                return None
            by_row = bool(_attr(node, "transB", 0))  # B [N, K] when transposed
            if error.shape[1 if by_row else 0] != mean.shape[0]:
                return None
            shift = (error @ mean if by_row else mean @ error) * (alpha / beta)
        else:  # MatMul, ConvTranspose: no bias input to absorb it
            return None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in initializers:
                return None
            bias = array_of(initializers[node.input[2]])
            if bias.dtype != np.float32 or bias.shape != shift.shape:
                return None
        else:
            bias = np.zeros(shift.shape, dtype=np.float32)
        if not np.all(np.isfinite(shift)):
            return None
        report.bias_corrected.append(node.name)
        return (bias.astype(np.float64) - shift).astype(np.float32)

    def set_bias(node: onnx.NodeProto, name: str) -> None:
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)

    def bias_node(
        node: onnx.NodeProto,
        w_scale: np.ndarray,
        x_scale: np.float32,
        corrected: np.ndarray | None,
    ) -> tuple[str, onnx.NodeProto | None] | None:
        """Case 3: (new bias input, its DQ node or None when shared); None keeps it float.

        `corrected` (case 7) replaces the bias's value; it is this node's own, never shared.
        """
        if corrected is not None:
            bias = f"{node.input[2] if len(node.input) > 2 and node.input[2] else node.name}"
            b = corrected
            if b.shape[0] != w_scale.shape[0]:
                return None
            b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
            key = (f"{bias}@{node.name}", b_scale.tobytes())
        else:
            if len(node.input) < 3 or not node.input[2]:
                return None
            bias = node.input[2]
            if bias not in initializers:
                return None
            b = array_of(initializers[bias])
            if b.dtype != np.float32 or b.ndim != 1 or b.shape[0] != w_scale.shape[0]:
                return None
            b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
            key = (bias, b_scale.tobytes())
        if key in bias_dq:
            return bias_dq[key][0], None
        q = quantize_bias(b, b_scale)
        if q is None:
            report.notes.append(f"{node.name}: bias overflows int32 at scale s_x * s_w; kept float")
            return None
        q_name = const(f"{bias}_quantized", q)
        s_name = const(f"{bias}_scale", b_scale)
        z_name = const(f"{bias}_zero_point", np.zeros_like(q))
        out = names.new(f"{bias}_dequantized")
        dq = helper.make_node(
            "DequantizeLinear",
            [q_name, s_name, z_name],
            [out],
            name=names.new(f"{bias}_DequantizeLinear"),
            axis=0,
        )
        bias_dq[key] = (out, dq)
        report.dequantize_linear += 1
        return out, dq

    # Rebuild the node list in order (case 5, last paragraph).
    graph_inputs = [v.name for v in graph.input]
    new_nodes: list[onnx.NodeProto] = []
    placed: set[str] = set()
    placed_ids: set[int] = set()  # weight DQs shared by several readers go before the first
    for tensor in pairs:  # pairs on graph inputs (and any tensor with no producer) go first
        if tensor in graph_inputs:
            new_nodes.extend(pair_nodes[tensor])
            placed.add(tensor)

    for node in graph.node:
        if node.name in by_name:
            cand = by_name[node.name]
            activation, weight = cand.tensors()
            axis = _weight_axis(node)
            floor = bias_floor(node, params[activation].scale, axis)
            w_out, w_scale, w_node = weight_node(cand, axis, floor)
            if id(w_node) not in placed_ids:
                new_nodes.append(w_node)
                placed_ids.add(id(w_node))
            key = (weight, axis) if floor is None else (weight, axis, floor.tobytes())
            corrected = corrected_bias(node, cand, axis, key)
            bias = bias_node(node, w_scale, params[activation].scale, corrected)
            if bias is not None:
                b_out, b_node = bias
                if b_node is not None:
                    new_nodes.append(b_node)
                set_bias(node, b_out)
            elif corrected is not None:  # overflows int32: the corrected bias stays float
                set_bias(node, const(f"{node.name}_bias_corrected", corrected))
            node.input[0] = dq_of[activation]
            node.input[1] = w_out
        elif node.name in weight_only_names:  # case 6: int8 storage, float compute
            cand = weight_only_names[node.name]
            axis = _weight_axis(node)
            w_out, _, w_node = weight_node(cand, axis)
            if id(w_node) not in placed_ids:
                new_nodes.append(w_node)
                placed_ids.add(id(w_node))
            node.input[1] = w_out
            corrected = corrected_bias(node, cand, axis, (cand.weight, axis))
            if corrected is not None:
                set_bias(node, const(f"{node.name}_bias_corrected", corrected))
            for i, name in enumerate(node.input):
                if i != 1 and name in redirect_all:
                    node.input[i] = dq_of[name]
        else:
            for i, name in enumerate(node.input):
                if name in redirect_all:
                    node.input[i] = dq_of[name]
                elif (node.name, i) in redirect_at:
                    node.input[i] = dq_of[redirect_at[(node.name, i)]]
        new_nodes.append(node)
        for out in node.output:
            if out in pair_nodes and out not in placed:
                new_nodes.extend(pair_nodes[out])
                placed.add(out)
    missing = [t for t in pairs if t not in placed]
    if missing:
        # produced by nothing in the main graph and not an input: an initializer (excluded
        # in case 1) or an outer-scope name; neither can happen in a main graph
        raise UsageError(f"cannot place Q/DQ for tensors with no producer: {missing[:3]}")

    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unread_initializers(model, replaced)


def _fill_stubs(model: onnx.ModelProto, source: onnx.ModelProto, stubs: set[str]) -> None:
    """Give the initializers `skeleton` left without data (`stubs`) that `model` still has
    their bytes from `source`."""
    full = {t.name: t for t in source.graph.initializer if t.name in stubs}
    for tensor in model.graph.initializer:
        if tensor.name in full:
            tensor.CopyFrom(full[tensor.name])


def _drop_unread_initializers(model: onnx.ModelProto, replaced: set[str]) -> None:
    """Remove the float weights/biases in `replaced` that no node (of any scope) reads now."""
    graph = model.graph
    read = {o.name for o in graph.output} | {v.name for v in graph.input}
    for g in graph_protos(graph):
        for node in g.node:
            read.update(node.input)
    drop_initializers(graph, {t.name for t in graph.initializer if t.name in replaced} - read)
