"""The `optimize` pipeline: load, rewrite to a fixed point, verify parity, write atomically.

1. Load the model (never modified); pin input shapes and raise the opset when asked.
2. Rewrite with the lossless rules to a fixed point; check parity against the original (rtol
   bar), retrying with fewer weight rescalings when rounding breaks it.
   With `debug_verify=True` every pass that changed the graph is checked on the spot
   (`StepVerifier`): onnx.checker, then parity on generated inputs against the model just
   before that pass, with the same rtol/atol. A failure raises `BrokenPassError` naming the
   pass, what it applied and the passes before it; nothing is written. A parity failure in a
   pass that rescaled weights (BatchNorm and Mul folds) first goes to the retries above, as
   the final check's would.
3. With `quantize=NAME` (a lossy stage of `onnxshrink.rules.LOSSY_STAGES`: "int8", "fp16"):
   run the stage on the lossless model (int8 is `onnxshrink.rules.int8.quantize_int8`:
   calibration, QDQ placement within the error budget), then judge the quantized model against
   the original on the parity inputs (held-out when the user gives them) with cosine, SNR,
   noise-to-signal ratio and argmax agreement. Over the budget there: a warning note, no
   failure.
4. Write the result atomically, only after all of the above.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxshrink.engine.graph import all_graphs, pack_subbyte_constants
from onnxshrink.engine.io import (
    SESSION_FILE_BYTES,
    check_output_path,
    discard_store,
    graph_protos,
    load_model,
    materialize,
    model_bytes,
    offload,
    release_memory,
    save_model,
    skeleton,
    structure_only,
)
from onnxshrink.engine.passes import (
    BrokenPassError,
    Pass,
    PassCheckFailed,
    PassManager,
    PassResult,
    PassStats,
    RuleContext,
)
from onnxshrink.engine.shapes import convert_opset, default_opset, infer_shapes, pin_input_shapes
from onnxshrink.errors import (
    OnnxShrinkError,
    ParityError,
    TimeLimitError,
    UsageError,
    first_line,
    require_onnxruntime,
)
from onnxshrink.quant.calibration import DEFAULT_BATCH
from onnxshrink.quant.lossy import (
    HOW_TO_CALIBRATE,
    ChainedStage,
    HeldOutCheck,
    LossyStage,
    StagedProgress,
    StageResult,
    StageSettings,
    as_calibration_data,
    check_settings,
    float_output_names,
    held_out_check,
)
from onnxshrink.quant.sensitivity import DEFAULT_MAX_ERROR
from onnxshrink.quant.sparsity import DEFAULT_SPARSIFY_MAX_ERROR, SparsifySpec
from onnxshrink.verify.measure import TaskMetric, load_metric
from onnxshrink.verify.measure import mask_input as find_mask_input
from onnxshrink.verify.parity import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEFAULT_TIME_LIMIT,
    InputBatches,
    ParityReport,
    Reference,
    check_batch,
    check_parity,
    check_time_limit,
    generate_inputs,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelSummary:
    """Size figures of a model, for the before/after table."""

    nodes: int
    nodes_total: int
    initializers: int
    parameters: int
    bytes: int
    ops: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelSummary:
        ops: Counter[str] = Counter()
        total = 0
        params = 0
        inits = 0

        def walk(graph: onnx.GraphProto) -> None:
            nonlocal total, params, inits
            for init in graph.initializer:
                inits += 1
                params += int(np.prod(init.dims)) if init.dims else 1
            for node in graph.node:
                total += 1
                ops[
                    node.op_type
                    if node.domain in ("", "ai.onnx")
                    else f"{node.domain}.{node.op_type}"
                ] += 1
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        walk(attr.g)
                    elif attr.type == onnx.AttributeProto.GRAPHS:
                        for sub in attr.graphs:
                            walk(sub)
                    elif attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                        params += int(np.prod(attr.t.dims)) if attr.t.dims else 1

        walk(model.graph)
        return cls(len(model.graph.node), total, inits, params, model_bytes(model), ops)


@dataclass
class OptimizeResult:
    """Everything `optimize` learned; the CLI renders it as a table.

    With a lossy stage (`quantize="int8"`, "fp16", ...), `model`/`after` are its model,
    `parity` is the lossless stage's check, `quantization` what the stage did and
    `quantized_parity` the check of its model against the original (None with
    `verify=False`), and `lossless_path` where the lossless stage's model was also written
    (`optimize(lossless_output=...)`; None otherwise), e.g. to benchmark it beside the result.
    """

    model: onnx.ModelProto
    before: ModelSummary
    after: ModelSummary
    stats: PassStats
    parity: ParityReport | None
    output_path: Path | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    quantization: StageResult | None = None
    quantized_parity: HeldOutCheck | None = None
    lossless_path: Path | None = None


# Rewrite tiers, tried in order until parity holds. Folding a scale into weights is exact in
# real arithmetic but re-rounds every weight; on numerically sensitive models the accumulated
# float32 rounding can pass the bar (measured: PP-OCRv5 det, 110 folds, 1.4e-4 on one page where
# the original itself is 4e-5 from a float64 evaluation). Later tiers rescale fewer weights:
# first no output-side Mul folds into Conv/Gemm, then no rescaling at all.
_TIERS: tuple[dict[str, object], ...] = (
    {},
    {"fold_output_scales": False},
    {"fold_scales": False},
)
_SCALE_FOLD_RULES = ("fold-batchnorm", "fold-affine-into-producer", "fold-affine-into-conv")


#: constants over this many bytes are exported one at a time, not by onnx-graphsurgeon
EXPORT_DIRECT_BYTES = 1 << 20


def _export(graph: gs.Graph, consume: bool) -> onnx.ModelProto:
    """gs.export_onnx, with the large constants of the main graph exported apart.

    Large constants of the main graph are left out of gs's export (typed stand-ins take their
    place) and appended to the exported graph one by one: gs builds every initializer in a
    list and `make_graph` then copies the list, so a model's weights would be held twice over
    on top of the graph's own (issue 9, 4: 7x the model's size at the peak on a big model).
    With `consume` (the graph's last export), each constant's array is let go once its bytes
    are in the model, so that the arrays and the model never both hold all the weights.
    """
    direct = [
        t
        for t in graph.tensors().values()
        if isinstance(t, gs.Constant)
        and _constant_bytes(t) > EXPORT_DIRECT_BYTES
        and (isinstance(t._values, LazyValues) or t.values.dtype.kind in "fiub")
    ]
    if not direct:
        return gs.export_onnx(graph, do_type_check=False)
    if consume:
        gc.collect()  # copies of the graph made by earlier passes may still share its arrays
    light = graph.copy()
    stand_ins = light.tensors()
    for tensor in direct:
        stand_in = stand_ins[tensor.name]
        stand_in.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))
        stand_in.type = "tensor_type"  # to_variable leaves Variable.type unset
        stand_in.__dict__.pop("_values", None)  # nor does it let go of the array
    model = gs.export_onnx(light, do_type_check=False)
    del light
    names = {t.name for t in direct}
    infos = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)
    for tensor in direct:
        init = model.graph.initializer.add()
        if isinstance(tensor._values, LazyValues):  # never loaded: the source's own tensor
            init.CopyFrom(tensor._values.tensor)
        else:
            init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(tensor.values)))
        init.name = tensor.name
        if consume:
            tensor._values = LazyValues(init)
    return model


def export_graph(graph: gs.Graph, consume: bool = False) -> onnx.ModelProto:
    """gs.export_onnx, with outer-scope constants stored once (see `_hoist_shared_initializers`),
    optional-typed values kept (`_hide_optional_types`), sub-byte constants packed
    (`pack_subbyte_constants`), empty list attributes kept (`_mark_empty_lists`) and large
    constants exported one at a time (`_export`; `consume` for a graph's last export)."""
    pack_subbyte_constants(graph)
    marked = _mark_empty_lists(graph)
    hidden = _hide_optional_types(graph)
    try:
        model = _export(graph, consume)
    finally:
        for node, key in marked:
            node.attrs[key] = []
        for tensor, dtype, _ in hidden:
            tensor.dtype = dtype
    _restore_empty_lists(model.graph)
    types = {tensor.name: proto for tensor, _, proto in hidden}
    for g in graph_protos(model.graph):
        for value in [*g.input, *g.output, *g.value_info]:
            if value.name in types and not value.HasField("type"):
                value.type.CopyFrom(types[value.name])
    _hoist_shared_initializers(model.graph)
    return model


def _hide_optional_types(graph: gs.Graph) -> list[tuple[gs.Tensor, object, onnx.TypeProto]]:
    """Clear the dtype of optional-typed tensors, which gs imports but cannot export: it keeps
    the optional's element TypeProto as the dtype (and `Graph.copy` loses the `type` that
    says so), then fails on it. Returns (tensor, dtype, type) for `export_graph` to put back
    on both sides. An If branch that returns an Optional is how ONNX models an optional
    output (the `test_if_opt` node test)."""
    hidden: list[tuple[gs.Tensor, object, onnx.TypeProto]] = []
    for g in all_graphs(graph):
        for tensor in g.tensors().values():
            if isinstance(tensor.dtype, onnx.TypeProto):  # only optionals import this way
                proto = onnx.TypeProto()
                proto.optional_type.elem_type.CopyFrom(tensor.dtype)
                hidden.append((tensor, tensor.dtype, proto))
                tensor.dtype = None
    return hidden


# An empty list attribute travels through gs's export as a string holding its type.
_EMPTY_LIST = "\x00onnxshrink-empty-list:"
_LIST_TYPES = {
    onnx.AttributeProto.INTS,
    onnx.AttributeProto.FLOATS,
    onnx.AttributeProto.STRINGS,
    onnx.AttributeProto.TENSORS,
    onnx.AttributeProto.GRAPHS,
}


def _mark_empty_lists(graph: gs.Graph) -> list[tuple[gs.Node, str]]:
    """Replace every empty list attribute by a string naming its type; return where.

    gs imports an empty INTS/FLOATS/... attribute as `[]` and cannot export it again (onnx's
    make_attribute cannot tell the type of an empty list: an internal error on `axes=[]`).
    The type is the one the op's schema declares (INTS for attributes it does not know);
    `_restore_empty_lists` turns the strings back into empty lists of that type.
    """
    marked = []
    for sub in all_graphs(graph):
        for node in sub.nodes:
            for key, value in list(node.attrs.items()):
                if isinstance(value, (list, tuple)) and not value:
                    node.attrs[key] = _EMPTY_LIST + _declared_list_type(node, key, graph.opset)
                    marked.append((node, key))
    return marked


def _declared_list_type(node: gs.Node, key: str, opset: int | None) -> str:
    try:
        schema = onnx.defs.get_schema(
            node.op, opset or onnx.defs.onnx_opset_version(), node.domain or ""
        )
        declared = schema.attributes[key].type
    except Exception:  # an op or attribute no schema describes
        return "INTS"
    return onnx.AttributeProto.AttributeType.Name(declared) if declared in _LIST_TYPES else "INTS"


def _restore_empty_lists(root: onnx.GraphProto) -> None:
    prefix = _EMPTY_LIST.encode()
    for graph in graph_protos(root):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.STRING and attr.s.startswith(prefix):
                    kind = attr.s[len(prefix) :].decode()
                    attr.ClearField("s")
                    attr.type = onnx.AttributeProto.AttributeType.Value(kind)


def _hoist_shared_initializers(root: onnx.GraphProto) -> int:
    """Store once a constant that gs exported into several graphs (it writes an outer-scope
    constant into every If/Loop body that reads it): keep one copy in the innermost graph
    enclosing all of them. Returns how many copies were dropped."""
    parent: dict[int, onnx.GraphProto | None] = {id(root): None}
    graphs: list[onnx.GraphProto] = []

    def walk(g: onnx.GraphProto) -> None:
        graphs.append(g)
        for node in g.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subs:
                    parent[id(sub)] = g
                    walk(sub)

    walk(root)

    def ancestors(g: onnx.GraphProto) -> list[onnx.GraphProto]:
        chain = [g]
        while (up := parent[id(chain[-1])]) is not None:
            chain.append(up)
        return chain[::-1]  # root first

    holders: dict[str, list[onnx.GraphProto]] = {}
    defined: dict[str, int] = {}  # how many non-initializer definitions a name has
    for g in graphs:
        for init in g.initializer:
            holders.setdefault(init.name, []).append(g)
        for name in [v.name for v in g.input] + [o for n in g.node for o in n.output]:
            defined[name] = defined.get(name, 0) + 1
    dropped = 0
    for name, gs_ in holders.items():
        if len(gs_) < 2 or defined.get(name):
            continue
        copies = [next(i for i in g.initializer if i.name == name) for g in gs_]
        if any(c.SerializeToString() != copies[0].SerializeToString() for c in copies[1:]):
            continue  # same name, different tensors in sibling scopes: leave them
        chains = [ancestors(g) for g in gs_]
        lca = None
        for level in zip(*chains, strict=False):  # chains differ in depth
            if all(g is level[0] for g in level):
                lca = level[0]
            else:
                break
        keep = onnx.TensorProto()
        keep.CopyFrom(copies[0])
        for g in gs_:
            kept = [i for i in g.initializer if i.name != name]
            del g.initializer[:]
            g.initializer.extend(kept)
        assert lca is not None  # every chain starts at the root
        lca.initializer.append(keep)
        dropped += len(gs_) - 1
    return dropped


#: constants larger than this are left out of shape inference (typed inputs stand in for them)
INFERENCE_CONSTANT_BYTES = 1024


def _shape_inference_pass() -> Pass:
    """A pass that refreshes tensor shapes; it never counts as a modification.

    Inference runs on a light copy of the graph (after onnx-ir's shape inference pass): every
    constant over `INFERENCE_CONSTANT_BYTES` becomes a typed graph input of the same dtype and
    shape, so inference knows its shape without the weights being serialized (small constants
    stay: data propagation folds shape arithmetic with them). The inferred dtypes and shapes
    are then set on the graph's own tensors, so the graph is never exported with its weights
    or imported again; on a 90 MB model that is 180 MB of copies saved per sweep. Shapes of
    intermediate tensors are recomputed from scratch (rules may have made them stale); the
    graph's inputs and outputs keep theirs.
    """

    class _Infer:
        name = "shape-inference"

        def __call__(self, graph: gs.Graph, ctx: RuleContext) -> PassResult:
            light = graph.copy()
            kept = {id(t) for t in (*light.inputs, *light.outputs)}
            stand_ins = []
            for tensor in light.tensors().values():
                if isinstance(tensor, gs.Constant):
                    if _constant_bytes(tensor) > INFERENCE_CONSTANT_BYTES:
                        tensor.to_variable(dtype=tensor.dtype, shape=list(tensor.shape))
                        tensor.type = "tensor_type"  # to_variable leaves Variable.type unset
                        tensor.__dict__.pop("_values", None)  # nor lets go of the array
                        stand_ins.append(tensor)
                elif id(tensor) not in kept:
                    tensor.shape = None  # stale after rewrites: inference recomputes it
            light.inputs.extend(stand_ins)
            inferred = infer_shapes(export_graph(light))
            found = {vi.name: vi for vi in inferred.graph.value_info}
            outputs = {id(t) for t in (*graph.inputs, *graph.outputs)}
            for name, tensor in graph.tensors().items():
                if not isinstance(tensor, gs.Variable) or id(tensor) in outputs:
                    continue
                info = found.get(name)
                if info is None:
                    tensor.shape = None
                    continue
                tensor.shape = get_onnx_tensor_shape(info)
                dtype = get_onnx_tensor_dtype(info)
                if dtype is not None:
                    tensor.dtype = dtype
            return PassResult(graph, False)

    return _Infer()


# check_parity's reasons for an unverified check that optimize acts on (issue 9, 2 and 3)
_UNLOADABLE = "ONNX Runtime cannot load the optimized model"
_ORIGINAL_FAILS = "the original model fails on the inputs"
_NO_INPUTS = "no inputs to compare on"


def _constant_bytes(tensor: gs.Constant) -> int:
    """Bytes of a constant's values, without loading lazily imported ones."""
    values = tensor._values  # LazyValues knows its size without loading the data
    return int(getattr(values, "nbytes", 0))


@dataclass
class StepCheck:
    """The feeds and tolerance `debug_verify` checks each pass's result with (docstring, 2)."""

    feeds: list[dict[str, np.ndarray]]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    #: set when the parity half could not run (the starting model fails on the feeds, say)
    unverified: str | None = None
    #: seconds one ONNX Runtime run may take (`onnxshrink.verify.parity.run_with_limit`)
    time_limit: float | None = DEFAULT_TIME_LIMIT


# How the two models of a per-pass parity check are named in its reasons.
_BEFORE, _AFTER = "pre-pass", "post-pass"


class StepVerifier:
    """The `check_between` hook of `debug_verify`: checker and parity after a pass.

    `before` is the model the first pass starts from; `finish` turns the live graph into the
    model that would be written. Each check compares with the model after the previous
    modifying pass. When the starting model cannot be run on the feeds (custom ops, say), the
    parity half is skipped with a warning (`check.unverified` says why) and only the checker
    runs.
    """

    def __init__(
        self,
        before: onnx.ModelProto,
        finish: Callable[[gs.Graph], onnx.ModelProto],
        check: StepCheck,
    ):
        self.reference = Reference(before)
        self.finish = finish
        self.check = check

    def __call__(self, graph: gs.Graph, pass_name: str) -> None:
        model = self.finish(graph)
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise PassCheckFailed(f"onnx.checker: {first_line(exc)}", kind="checker") from None
        if self.check.unverified is None:
            report = check_parity(
                self.reference,
                model,
                self.check.feeds,
                rtol=self.check.rtol,
                atol=self.check.atol,
                labels=(_BEFORE, _AFTER),
                time_limit=self.check.time_limit,
            )
            reason = report.reason or ""
            if not report.verified and not reason.startswith(
                f"ONNX Runtime cannot load the {_AFTER} model"
            ):
                logger.warning("debug-verify: parity between passes not checked: %s", reason)
                self.check.unverified = reason
            elif not report.passed:
                bad = [f"{o.name}: {o.reason}" for o in report.outputs if not o.ok]
                raise PassCheckFailed(
                    "outputs moved past the tolerance against the model before it "
                    f"({'; '.join(bad)})"
                    if bad
                    else reason,  # it cannot be loaded or run, or its outputs differ in name
                    kind="parity",
                )
        self.reference = Reference(model)


def rewrite_model(
    model: onnx.ModelProto,
    passes: Sequence[Pass] | None = None,
    max_steps: int = 10,
    options: dict | None = None,
    step_check: StepCheck | None = None,
) -> tuple[onnx.ModelProto, PassStats]:
    """Apply `passes` (default: the lossless pipeline) to a fixed point; return a new model.

    `model` itself is not modified. Metadata (producer, metadata_props, ir_version, functions)
    is carried over; an IR version below 4 becomes 4 (its initializers are constants, no
    longer listed as inputs). A graph input that also has an initializer (IR >= 4: a default the caller
    may override) stays an input with its default, and no rule treats it as a constant.
    With `step_check`, every pass that changes the graph is verified on the spot
    (`StepVerifier`); a failure raises `BrokenPassError`.
    """
    from onnxshrink.rules import lossless_passes

    passes = list(passes) if passes is not None else lossless_passes()
    overridable = _overridable_initializers(model)
    source = model
    if overridable:
        # Rewrite with those values hidden, so that they are plain inputs to every rule.
        source = onnx.ModelProto()
        source.CopyFrom(model)
        kept = [t for t in source.graph.initializer if t.name not in overridable]
        del source.graph.initializer[:]
        source.graph.initializer.extend(kept)
    # No inference here: the manager's first pass is shape inference.
    graph = gs.import_onnx(source)
    _restore_type_attributes(source.graph, graph)
    stats = PassStats()
    ctx = RuleContext(graph, graph, default_opset(model), stats, dict(options or {}))

    def finish(graph: gs.Graph, consume: bool = False) -> onnx.ModelProto:
        out = export_graph(graph, consume)
        out.graph.initializer.extend(overridable.values())
        _carry_metadata(model, out)
        return out

    verifier = StepVerifier(model, finish, step_check) if step_check is not None else None
    manager = PassManager(
        [_shape_inference_pass(), *passes], max_steps=max_steps, check_between=verifier
    )
    result = manager(graph, ctx)
    final = result.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return finish(final, consume=True), stats


def _restore_type_attributes(proto: onnx.GraphProto, graph: gs.Graph) -> None:
    """Put back the TypeProto attributes gs skips on import (Optional's `type`: without it an
    empty Optional is invalid), as values gs exports again; gs keeps the nodes in order."""
    for onnx_node, node in zip(proto.node, graph.nodes, strict=True):
        for attr in onnx_node.attribute:
            if attr.type == onnx.AttributeProto.TYPE_PROTO and attr.name not in node.attrs:
                node.attrs[attr.name] = attr.tp
            elif attr.type == onnx.AttributeProto.GRAPH and isinstance(
                node.attrs.get(attr.name), gs.Graph
            ):
                _restore_type_attributes(attr.g, node.attrs[attr.name])


def _overridable_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers that are also graph inputs, in IR >= 4 models (where that means a default).

    Before IR 4 every initializer had to be listed as an input, so there it means nothing and
    they are left to the rules (and onnx-graphsurgeon drops them from the inputs).
    """
    if model.ir_version < 4:
        return {}
    inputs = {v.name for v in model.graph.input}
    return {t.name: t for t in model.graph.initializer if t.name in inputs}


def _carry_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    # IR 3 required every initializer to be a graph input too; the rules treat them as the
    # constants they are (`_overridable_initializers`), and the result says so with IR 4.
    dst.ir_version = max(src.ir_version, 4)
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    dst.domain = src.domain
    dst.model_version = src.model_version
    dst.doc_string = src.doc_string
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    if src.functions and not dst.functions:
        dst.functions.extend(src.functions)
    # The interface is the user's contract: shape inference may have named anonymous dims
    # ("unk__54"); put the declared input and output types back exactly as they were.
    # Inputs from inputs and outputs from outputs: a name that is both (an input passed
    # through) may be declared with two types, and the input's must stay the input's.
    for src_values, dst_values in (
        (src.graph.input, dst.graph.input),
        (src.graph.output, dst.graph.output),
    ):
        src_types = {v.name: v.type for v in src_values}
        for value in dst_values:
            if value.name in src_types:
                value.type.CopyFrom(src_types[value.name])
    # Graph-level value_info is a cache of inferred shapes; keep the file lean.
    for graph in graph_protos(dst.graph):
        del graph.value_info[:]


def optimize(
    model: onnx.ModelProto | str | Path,
    output: str | Path | None = None,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    inputs: str | Path | Iterable[dict[str, np.ndarray]] | None = None,
    opset: int | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    verify: bool = True,
    samples: int = 2,
    seed: int = 0,
    passes: Sequence[Pass] | None = None,
    quantize: str | None = None,
    calibration_data: str | Path | Iterable[dict[str, np.ndarray]] | None = None,
    calibration_method: str = "percentile",
    calibration_workers: int = 1,
    search_workers: int = 1,
    target: str = "ort-cpu",
    exclude: Sequence[str] = (),
    max_error: float | None = None,
    calibration_provider: str = "cpu",
    check_speed: bool = True,
    calibration_batch: int = DEFAULT_BATCH,
    batch: int | None = None,
    metric: str | None = None,
    mask_input: str | None = None,
    block_size: int = 32,
    int4_method: str = "gptq",
    symmetric: bool = False,
    accuracy_level: int = 4,
    sparsify: str | None = None,
    compress: bool = False,
    reconstruct: bool = True,
    progress: StagedProgress | None = None,
    debug_verify: bool = False,
    allow_unverified: bool = False,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    lossless_output: str | Path | None = None,
) -> OptimizeResult:
    """Rewrite a model with the lossless rules, verify it against the original, write it.

    - `model`: a path or a ModelProto (never modified).
    - `output`: where to write; nothing is written when None or when parity fails.
    - `input_shapes`: pins dynamic input dims (kept in the output model).
    - `inputs`: an .npz path, a folder of them, or an iterable of feed dicts; default:
      `samples` generated feeds. With quantization these are the held-out data the quantized
      model is judged on: never pass the calibration samples.
    - `opset`: raise the model's ai.onnx opset first (lets newer fused ops be used).
    - `batch` (`--batch`): samples per run for every source of samples (axis 0 of an .npz is
      samples, one per entry): `inputs`, the calibration data, and axis 0 of generated inputs;
      UsageError where the model fixes another batch size. None: the model's fixed batch,
      else runs of at most `calibration_batch` from files, 1 for generated inputs.
    - `allow_unverified`: write the result even when parity could not be checked (ONNX Runtime
      cannot run the original: custom ops, say), with a note; by default that is a ParityError
      and nothing is written, since a caller reads success as "verified".
    - `quantize="int8"` or `"fp16"` (a name in `onnxshrink.rules.LOSSY_STAGES`): then run that
      lossy stage (module docstring, 3) with `calibration_data` (an .npz, a folder of them,
      `loader.py[:function]`, `random`, or a list of feed dicts; required),
      `calibration_method` (minmax, percentile, entropy, mse), `calibration_workers` (int8's
      statistics pass on that many shards in worker processes, with identical ranges:
      `onnxshrink.quant.calibration`, 14), `search_workers` (the sensitivity ranking's
      candidates measured in that many worker processes: `onnxshrink.quant.fanout`),
      `target` (ort-cpu, ort-cuda, tensorrt),
      `exclude` (regexes on node names / op types kept float), `max_error` (output
      noise-to-signal ratio allowed on calibration samples), `calibration_provider` and
      `check_speed` (int8 compute only where it is faster on ORT CPU: `onnxshrink.rules.int8`, 5),
      `calibration_batch` (samples per run where the batch dim is dynamic and `batch` is
      None: every source, and `inputs`, is cut into runs of at most this many samples, so
      memory does not depend on how many samples a file holds), `metric`
      (`module:function` or `file.py:function`: a task metric called with the original's and the quantized model's outputs of each
      held-out batch; its mean is reported with the held-out check), `mask_input` (the
      input whose zeros mark padded positions left out of every error figure; default: an
      integer input named `attention_mask`, "none" for no mask). int4 reads `block_size`,
      `int4_method` (rtn, gptq), `symmetric` and `accuracy_level` (`onnxshrink.rules.int4`).
      `progress(stage, done, total)` reports the parity check, calibration, sensitivity, speed
      check and held-out check, run by run (total 0 when unknown).
    - `sparsify`: "unstructured:R", "N:M" or "channels:R" (`onnxshrink.quant.sparsity`): prune
      first (a lossy stage of `onnxshrink.rules.SPARSIFY_STAGES`), then run `quantize` on the
      pruned model if given. Calibration data is optional for pruning alone: without it the
      criterion is weight magnitude and the budget is measured on random inputs (`random`).
      `compress` stores unstructured/N:M pruned weights packed (bit mask + values, or sparse
      initializers where smaller: `onnxshrink.rules.sparsify_weights`); `reconstruct=False`
      skips the channel stage's refit of the layers after pruned channels.
    - `max_error`: None gives each stage its default budget (`DEFAULT_MAX_ERROR` for
      quantization, `DEFAULT_SPARSIFY_MAX_ERROR` for pruning); with `sparsify` and `quantize`
      together a given value is each stage's budget against the model it starts from.
    - `debug_verify`: check the model after every pass that changed it (module docstring, 2:
      onnx.checker, and parity with the model before that pass on `samples` generated feeds,
      with `rtol`/`atol`); slow, for finding the pass that breaks a model.
    - `time_limit`: seconds one ONNX Runtime run of a parity check (either model, one input)
      may take; past it the run is stopped and TimeLimitError raised (a Loop that never ends
      cannot hang the call). None or 0: no limit.
    - `lossless_output`: with a lossy stage, also write the lossless stage's model (fp32, the
      model the stage starts from) there, from memory, so that `--bench` can time it beside
      the original and the result (the lossless speed-up is then not credited to the stage).
    Raises BrokenPassError (`onnxshrink.engine.passes`) naming the pass when `debug_verify`
    catches one, ParityError when an output of the lossless model moves more than
    `atol + rtol * max|ref|` (see `onnxshrink.verify.parity`), UsageError for bad settings or data
    (ModelLoadError for a missing or invalid model), OnnxRuntimeMissingError when no ONNX Runtime
    is installed; nothing is written then.
    """
    start = time.perf_counter()
    require_onnxruntime()
    check_time_limit(time_limit)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    stage, max_error, sparsity = _lossy_stage(quantize, sparsify, compress, max_error)
    if stage is not None:
        if calibration_data is None and quantize is None:
            calibration_data = "random"  # pruning: magnitude criterion, budget on noise
        if calibration_data is None or (
            isinstance(calibration_data, (str, Path)) and not str(calibration_data).strip()
        ):
            raise UsageError(f"--quantize {quantize} needs calibration data: {HOW_TO_CALIBRATE}")
        check_settings(
            method=calibration_method,
            target=target,
            exclude=exclude,
            max_error=max_error,
            provider=calibration_provider,
        )
    if batch is not None:
        calibration_batch = batch  # one size for every source of samples
    settings = StageSettings(
        target=target,
        exclude=exclude,
        max_error=max_error,
        calibration_batch=calibration_batch,
        method=calibration_method,
        provider=calibration_provider,
        check_speed=check_speed,
        progress=progress,
        calibration_workers=calibration_workers,
        search_workers=search_workers,
        mask_input=mask_input,
        block_size=block_size,
        int4_method=int4_method,
        symmetric=symmetric,
        accuracy_level=accuracy_level,
        sparsity=sparsity,
        compress=compress,
        reconstruct=reconstruct,
    )
    if stage is not None and hasattr(stage, "check"):
        stage.check(settings)  # the stage's own settings refused before any work
    task_metric = load_metric(metric) if metric is not None else None
    source_path = Path(model) if isinstance(model, (str, Path)) else None
    input_data_files: list[Path] = []  # the input's own external data: never written over
    original = (
        load_model(Path(model), data_files=input_data_files)
        if isinstance(model, (str, Path))
        else model
    )
    before = ModelSummary.of(original)
    # A large model is held once (issue 9, 4): optimize rewrites the model it loaded itself
    # instead of a copy, ONNX Runtime reads the original from its file, and the pre-rewrite
    # weights are dropped once the rewrite is done (a retry loads them again).
    large = source_path is not None and model_bytes(original) > SESSION_FILE_BYTES
    if mask_input is not None:
        find_mask_input(original, mask_input)  # a bad --mask-input fails before any work
    if output is not None:
        if source_path is not None and Path(output).resolve() == source_path.resolve():
            raise UsageError(
                f"{output}: output would overwrite the input model; choose another path"
            )
        check_output_path(output)

    def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
        """The model to rewrite: `model` with the opset and input shapes asked for."""
        if opset is not None:
            model = convert_opset(model, opset)
        if input_shapes:
            pin_input_shapes(model, input_shapes)
        return model

    if source_path is not None:
        loaded = prepared(original)  # loaded here: nobody else holds it
    else:
        loaded = onnx.ModelProto()
        loaded.CopyFrom(original)
        loaded = prepared(loaded)
    # `spec` describes the model (inputs, shapes, outputs) to everything but the rewrite; for a
    # large model it is a skeleton without the weights, so that only `work` holds them
    spec = skeleton(loaded) if large else loaded
    check_batch(spec, batch)  # after --input-shape, which may pin axis 0
    work: onnx.ModelProto | None = loaded
    del loaded
    if large:
        original = spec
    notes: list[str] = []
    if original.ir_version < 4:
        notes.append(
            f"IR version {original.ir_version} raised to 4: initializers are constants, no "
            "longer listed among the graph inputs"
        )
    if inputs is not None and not isinstance(inputs, (str, Path)):
        inputs = list(inputs)  # may be one-shot, and a retry reads it again
    calibration = None
    if stage is not None:
        # read up front (file headers, loader import) so that bad data fails before any work
        assert calibration_data is not None  # refused above
        calibration = as_calibration_data(calibration_data, spec, calibration_batch)

    # an .npz holding many samples is split along axis 0 into batches the model accepts;
    # the file headers are checked now, so a bad --inputs fails before any work
    batches = (
        InputBatches(inputs, spec, max_batch=calibration_batch)
        if isinstance(inputs, (str, Path))
        else None
    )

    def feeds() -> Iterable[dict[str, np.ndarray]]:
        if inputs is None:
            return (
                generate_inputs(spec, input_shapes, seed=seed + i, batch=batch or 1)
                for i in range(samples)
            )
        if isinstance(inputs, (str, Path)):
            assert batches is not None  # made from the path above
            return batches
        return inputs

    # how many runs feeds() makes, for the parity stage's progress
    feed_runs = (
        samples
        if inputs is None
        else batches.total
        if batches is not None
        else len(inputs)
        if isinstance(inputs, list)
        else None
    )

    step_check = None
    if debug_verify:
        generated = [generate_inputs(spec, input_shapes, seed=seed + i) for i in range(samples)]
        step_check = StepCheck(generated, rtol=rtol, atol=atol, time_limit=time_limit)

    parity = None
    failures: list[str] = []
    # one session and one run per feed, whatever the retries
    reference = Reference(source_path if source_path is not None else original)
    if large and verify:
        with _nothing_written_past_time_limit():
            # its outputs now, so that two sessions never coexist
            reference.prime(feeds(), time_limit)
    for tier, options in enumerate(_TIERS):
        last_tier = tier + 1 == len(_TIERS)
        if work is None:  # dropped after the last tier's rewrite: load it again
            assert source_path is not None  # only a model loaded here is dropped
            work = prepared(load_model(source_path, check=False))
        try:
            with _nothing_written_past_time_limit():
                rewritten, stats = rewrite_model(
                    work, passes, options=options, step_check=step_check
                )
            if large:
                work = None  # the rewritten model holds the weights now
                release_memory()  # the rewrite's graph is a web of cycles: free its arrays now
        except BrokenPassError as exc:
            # Rounding from weight rescaling is what the tiers are for (see _TIERS).
            if (
                exc.kind == "parity"
                and not last_tier
                and any(exc.rules.get(r) for r in _SCALE_FOLD_RULES)
            ):
                failures.append(f"pass {exc.pass_name!r}: {exc.__cause__}")
                logger.info("debug-verify: %s; retrying without weight rescaling", exc)
                continue
            raise BrokenPassError(
                f"{exc}; nothing written", exc.pass_name, exc.kind, exc.rules
            ) from exc.__cause__
        try:
            onnx.checker.check_model(structure_only(rewritten) if large else rewritten)
        except Exception as exc:
            raise OnnxShrinkError(
                f"internal error: the rewritten model is invalid ({exc}); nothing written"
            ) from None
        if not verify:
            notes.extend(_tier_notes(failures, options))
            break
        with _nothing_written_past_time_limit():
            parity = check_parity(
                reference,
                rewritten,
                feeds(),
                rtol=rtol,
                atol=atol,
                stop_on_failure=not last_tier,
                time_limit=time_limit,
                progress=_stage_progress(progress, "parity"),
                total=feed_runs,
            )
        if not parity.verified:
            reason = parity.reason or "not verified"
            if reason.startswith(_UNLOADABLE):
                # issue 9, 2: a result less loadable than its input is a failed rewrite
                failures.append(reason)
                if not last_tier:
                    logger.info("%s; retrying without weight rescaling", reason)
                    continue
                raise ParityError(
                    "the optimized model cannot be loaded by ONNX Runtime, which loads the "
                    f"original: {'; then '.join(failures)}; nothing written"
                )
            if inputs is not None and (
                reason.startswith(_ORIGINAL_FAILS) or reason == _NO_INPUTS
            ):  # issue 9, 3: the user's --inputs do not fit the model
                where = inputs if isinstance(inputs, (str, Path)) else "the given inputs"
                raise UsageError(
                    f"--inputs {where}: {reason.replace('; pass --input-shape or --inputs', '')}"
                )
            if not allow_unverified:  # issue 9, 10: CI reads exit 0 as verified
                raise ParityError(
                    f"parity could not be verified: {reason}; nothing written "
                    "(--allow-unverified writes it anyway, --no-verify skips the check)"
                )
            notes.append(f"parity not verified: {reason} (written: --allow-unverified)")
            break
        if parity.passed:
            notes.extend(_tier_notes(failures, options))
            break
        bad = [o for o in parity.outputs if not o.ok]
        failures.append(
            ", ".join(f"{o.name} moved {o.max_rel:.2e}" for o in bad) or str(parity.reason)
        )
        retry = not last_tier and any(stats.applied.get(r) for r in _SCALE_FOLD_RULES)
        if not retry:
            raise ParityError(
                f"the optimized model differs from the original beyond rtol {rtol:g}: "
                f"{'; then '.join(failures)}; nothing written"
            )
        logger.info("parity failed (%s); retrying without weight rescaling", failures[-1])

    if step_check is not None and step_check.unverified is not None:
        notes.append(
            f"--debug-verify checked each pass with onnx.checker only: {step_check.unverified}"
        )
    quantization = quantized_parity = None
    lossless_path = None
    if stage is not None and lossless_output is not None:
        # before the weights are offloaded below: the model is whole in memory here
        lossless_path = save_model(rewritten, lossless_output, avoid=input_data_files)
    store = None  # a large model's float weights, offloaded for the lossy stage
    try:
        if stage is not None and calibration is not None and large:
            # The stage reads the float weights only to quantize them and hands them to ONNX
            # Runtime in files: kept in a scratch data file, they are not held in memory beside
            # every float session the stage opens (issue 9, 4).
            store = Path(tempfile.mkdtemp(prefix="onnxshrink-weights-"))
            try:
                rewritten = offload(rewritten, store)
                release_memory()
            except OSError as exc:  # a full or read-only temp folder: keep them in memory
                logger.warning("weights kept in memory: cannot offload to %s (%s)", store, exc)
                discard_store(store)
                shutil.rmtree(store, ignore_errors=True)
                store = None
        final = rewritten
        if stage is not None and calibration is not None:
            quantization = stage.run(rewritten, calibration, settings)
            final = quantization.model
            notes.extend(quantization.notes)
            if quantization.synthetic and quantization.family == "pruning":
                notes.append(
                    "pruned without real calibration data: channels and weights chosen by "
                    "magnitude and the error budget measured on random inputs; pass samples "
                    "with --calibration-data for data-aware pruning and a meaningful budget"
                )
            elif quantization.synthetic:
                notes.append(
                    "calibrated on random inputs (--calibration-data random): activation ranges "
                    "do not come from real data and accuracy may suffer; pass real samples"
                )
            if verify:
                with _nothing_written_past_time_limit():
                    quantized_parity = _check_quantized(
                        reference,
                        original,
                        final,
                        feeds(),
                        inputs,
                        calibration_data,
                        max_error,
                        progress,
                        task_metric,
                        find_mask_input(original, mask_input),
                        time_limit,
                    )
                notes.extend(_held_out_notes(quantized_parity, max_error))
            else:
                notes.append("quantized model not checked against the original (--no-verify)")

        if store is not None:  # the returned model outlives the scratch folder
            final = materialize(final)
            if quantization is not None:
                quantization.model = final
        written = save_model(final, output, avoid=input_data_files) if output is not None else None
        return OptimizeResult(
            model=final,
            before=before,
            after=ModelSummary.of(final),
            stats=stats,
            parity=parity,
            output_path=written,
            seconds=time.perf_counter() - start,
            notes=notes,
            quantization=quantization,
            quantized_parity=quantized_parity,
            lossless_path=lossless_path,
        )
    finally:
        if store is not None:
            discard_store(store)
            shutil.rmtree(store, ignore_errors=True)


def _lossy_stage(
    quantize: str | None, sparsify: str | None, compress: bool, max_error: float | None
) -> tuple[LossyStage | None, float, SparsifySpec | None]:
    """The lossy stage `--quantize` / `--sparsify` ask for (chained when both: prune, then
    quantize), the budget it runs within, and the parsed `--sparsify`; UsageError for bad
    values. Without `--max-error` each stage has its own default budget
    (`DEFAULT_MAX_ERROR` for quantization, `DEFAULT_SPARSIFY_MAX_ERROR` for pruning); with
    both stages, `max_error` is each stage's budget and the returned one their sum."""
    from onnxshrink.rules import lossy_stage, sparsify_stage

    spec = SparsifySpec.parse(sparsify) if sparsify is not None else None
    if compress and (spec is None or spec.kind == "channels"):
        raise UsageError(
            "--compress stores the zeros of pruned weights packed: it needs --sparsify "
            "unstructured:R or N:M"
        )
    quantizer = lossy_stage(quantize) if quantize is not None else None
    pruner = sparsify_stage(spec) if spec is not None else None
    quantize_error = DEFAULT_MAX_ERROR if max_error is None else max_error
    prune_error = DEFAULT_SPARSIFY_MAX_ERROR if max_error is None else max_error
    if pruner is not None and quantizer is not None:
        chained = ChainedStage(pruner, quantizer, prune_error, quantize_error)
        return chained, prune_error + quantize_error, spec
    if pruner is not None:
        return pruner, prune_error, spec
    return quantizer, quantize_error, spec


@contextmanager
def _nothing_written_past_time_limit() -> Iterator[None]:
    """A parity run stopped by the time limit ends the call: say that nothing was written."""
    try:
        yield
    except TimeLimitError as exc:
        raise TimeLimitError(f"{exc}; nothing written") from None


def _tier_notes(failures: list[str], options: dict[str, object]) -> list[str]:
    """The note saying which weight rescalings a retry turned off, and why; none without one."""
    if not failures:
        return []
    what = (
        "Mul folds into the weights of the layer before them were"
        if options.get("fold_output_scales") is False
        else "all weight rescaling (BatchNorm and Mul folds) was"
    )
    if failures[0].startswith(_UNLOADABLE):  # issue 9, 2: not a rounding matter
        return [f"{what} turned off: with them, {failures[0]}"]
    return [
        f"{what} turned off: with them, {failures[0]} (float32 rounding accumulated "
        "over the folded layers); a larger --rtol keeps them"
    ]


def _check_quantized(
    reference: Reference,
    original: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    inputs: str | Path | list | None,
    calibration_data: object,
    max_error: float,
    progress: StagedProgress | None,
    metric: TaskMetric | None = None,
    mask: str | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> HeldOutCheck:
    """The quantized model against the original on the parity feeds (module docstring, 3)."""
    if inputs is None:
        source, held_out = "generated random inputs", False
    elif isinstance(inputs, (str, Path)):
        source = str(inputs)
        same = isinstance(calibration_data, (str, Path)) and _same_path(inputs, calibration_data)
        held_out = not same
    else:
        source, held_out = "the given feeds", calibration_data is not inputs
    return held_out_check(
        reference,
        quantized,
        feeds,
        source=source,
        held_out=held_out,
        float_outputs=float_output_names(original),
        metric=metric,
        mask=mask,
        time_limit=time_limit,
        progress=_stage_progress(progress, "held-out check"),
    )


def _stage_progress(
    progress: StagedProgress | None, stage: str
) -> Callable[[int, int], None] | None:
    """`progress` bound to one stage's name, as a `(done, total)` callback; None for None."""
    if progress is None:
        return None
    report = progress
    return lambda done, total: report(stage, done, total)


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _held_out_notes(check: HeldOutCheck, max_error: float) -> list[str]:
    """Notes on how far the held-out check can be trusted, and a warning over the budget."""
    notes = []
    if not check.verified:
        notes.append(f"quantized model not checked against the original: {check.reason}")
        return notes
    if check.source == "generated random inputs":
        notes.append(
            "the quantized model was checked on generated random inputs, not real data; pass "
            "held-out samples with --inputs for a meaningful accuracy figure"
        )
    elif not check.held_out:
        notes.append(
            "--inputs is the calibration data: the check of the quantized model is not on "
            "held-out data; pass other samples with --inputs"
        )
    if not check.error <= max_error:
        notes.append(
            f"warning: the quantized model's output noise-to-signal ratio on {check.source} is "
            f"{check.error:.3g}, over the budget {max_error:g} met on the calibration samples; "
            "calibrate on more representative data, lower --max-error or --exclude layers"
        )
    return notes
