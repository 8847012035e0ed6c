"""What a model is, and what `optimize` would do to it: the account `onnxshrink inspect` prints.

`inspect_model(model)` reads a ModelProto and never modifies it; `inspect_path(path)` loads
the file first (one-line `ModelLoadError` for a missing, empty or non-ONNX file) and adds what
only the files tell: their size on disk and the external data (which files, how many bytes).
Nothing is ever written. The result is a `ModelInspection` of dataclasses; `to_json()` gives
the JSON object `inspect --json` prints. Its parts:

1. The interface: inputs and outputs with dtypes and shapes (a dim parameter by its name, an
   unknown dim as None), opset imports of every domain, IR version, producer.
2. Size: nodes (main graph, and with subgraphs), the op histogram (subgraphs included;
   custom-domain ops as `domain.Op`), initializers, parameters (elements of initializers and
   Constant tensors, as `optimize` counts them), bytes in memory, bytes on disk, external data
   per file; the subgraphs of If/Loop/Scan (and any other graph attribute) with their sizes.
3. The lossless preview: the engine's own pipeline (`optimize.rewrite_model` with
   `rules.lossless_passes()`: the same passes, in the same order, to the same fixed point) on
   the model in memory; what fired how often, what declined and why, and the node count after.
   No pattern matching of its own: declines are the rules' own (`PassStats`). `optimize`
   verifies the result against the original and may then turn weight rescaling off
   (`optimize._TIERS`); the preview is the first attempt.
4. Opset hints: a rule that declines because the model's opset is too low ("Gelu needs opset
   20", or the pass's "needs opset 14, model has 12") names the opset that lets it fire. For
   each such opset the preview is run again on the model converted to it
   (`shapes.convert_opset`, as `optimize --opset N` does), and the difference is reported: the
   patterns found, the node count, the op types that change. That is measured, not guessed:
   a fusion that fires under another rule's name at the higher opset (HardSwish through the
   HardSigmoid rule) shows in the op changes.
5. The int8 plan per target profile (`quant.targets.PROFILES`), without calibration data and
   without ONNX Runtime: `rules.qdq.quantizable_nodes` on the previewed model (the model the
   int8 stage would start from), counting the layers that would compute in int8, those that
   would store int8 weights and compute in float, and those kept float, by reason; plus the
   embedding tables stored int8 per row on targets that store weights int8
   (`rules.quantize_gather`). The error budget and the speed check need calibration data and
   may keep more layers float: the plan is the upper bound.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from onnxshrink.engine.io import all_tensors, load_model, model_bytes
from onnxshrink.engine.passes import WHOLE_MODEL, PassStats
from onnxshrink.engine.shapes import convert_opset, default_opset
from onnxshrink.errors import OnnxShrinkError, UsageError, first_line

logger = logging.getLogger(__name__)

#: how a rule says that the model's opset is too low: "Gelu needs opset 20", "needs opset 14, ..."
_NEEDS_OPSET = re.compile(r"needs opset (\d+)")


@dataclass
class ValueInfo:
    """A graph input or output: dtype ("float", "int64"; the type for non-tensors) and shape.

    `shape` holds an int per fixed dim, the parameter's name for a named dim, None for an
    unknown one; `shape` itself is None when the rank is unknown.
    """

    name: str
    dtype: str
    shape: list[int | str | None] | None


@dataclass
class Subgraph:
    """One graph attribute of a node (If's branches, Loop's and Scan's body), nested ones too."""

    node: str
    op: str
    attribute: str
    #: nodes of this graph alone, and with the subgraphs nested in it
    nodes: int
    nodes_total: int
    #: 1 for a subgraph of the main graph, 2 for one inside it, ...
    depth: int


@dataclass
class DataFile:
    """An external data file: its location as the model names it, bytes on disk, tensors."""

    location: str
    bytes: int
    tensors: int


@dataclass
class RuleDecline:
    """A rule that declined, the reason it gave, and at how many match sites."""

    rule: str
    reason: str
    count: int


@dataclass
class GatedRule:
    """A rule that waits for a higher opset (module docstring, 4)."""

    rule: str
    needs_opset: int
    #: match sites found at the model's opset (None: the rule did not look, its ops are present)
    found: int | None
    #: times it fired in the preview at `needs_opset`
    fires: int = 0


@dataclass
class OpsetUnlock:
    """The preview rerun at a higher opset (module docstring, 4)."""

    opset: int
    rules: list[GatedRule] = field(default_factory=list)
    #: node count after the rewrite at this opset (None when the conversion failed)
    nodes_after: int | None = None
    #: op type -> change in count against the preview at the model's opset
    op_changes: dict[str, int] = field(default_factory=dict)
    #: why the model could not be tried at this opset
    error: str | None = None


@dataclass
class LosslessPreview:
    """What the lossless rules would do (module docstring, 3 and 4)."""

    opset: int
    nodes_before: int
    nodes_after: int | None = None
    applied: dict[str, int] = field(default_factory=dict)
    declined: list[RuleDecline] = field(default_factory=list)
    unlocks: list[OpsetUnlock] = field(default_factory=list)
    seconds: float = 0.0
    #: why the preview could not run (the model fails a pass); the other fields are empty then
    error: str | None = None


@dataclass
class TargetPlan:
    """The int8 plan on one target profile, without calibration (module docstring, 5)."""

    target: str
    #: Conv/ConvTranspose/Gemm/MatMul layers of the model
    layers: int
    int8_compute: int
    #: float compute with the weight stored int8
    int8_weights: int
    #: kept entirely float
    float: int
    #: reason -> how many layers kept float (or float compute) for it
    reasons: dict[str, int] = field(default_factory=dict)
    #: embedding Gather tables stored int8 per row, and their bytes before and after
    gather_tables: int = 0
    gather_bytes_before: int = 0
    gather_bytes_after: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class ExternalData:
    """The model's external data: total bytes on disk and per file."""

    bytes: int = 0
    files: list[DataFile] = field(default_factory=list)


@dataclass
class ModelInspection:
    """Everything `onnxshrink inspect` reports (module docstring); `to_json()` for --json."""

    path: str | None
    ir_version: int
    producer: str
    opsets: dict[str, int]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    nodes: int
    nodes_total: int
    ops: dict[str, int]
    initializers: int
    #: Constant nodes of every graph (exporters such as paddle2onnx keep weights in them)
    constants: int
    #: elements of initializers and Constant tensors
    parameters: int
    #: the model's bytes once loaded (weights included), and on disk (with its data files)
    bytes: int
    file_bytes: int | None
    external_data: ExternalData
    subgraphs: list[Subgraph]
    optimize: LosslessPreview
    int8: list[TargetPlan]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field, nested dataclasses as objects."""
        return dataclasses.asdict(self)


def inspect_path(path: str | Path, opset: int | None = None) -> ModelInspection:
    """Load the model at `path` (never modified) and inspect it, data files included.

    Raises ModelLoadError (a UsageError: one line, exit 2) for a missing, empty, unreadable or
    invalid file, UsageError for an `opset` below the model's.
    """
    start = time.perf_counter()
    p = Path(path)
    data_files: list[Path] = []
    model = load_model(p, data_files=data_files)
    external = _external_data(p, data_files) if data_files else ExternalData()
    result = inspect_model(model, opset=opset)
    result.path = str(p)
    result.external_data = external
    result.file_bytes = p.stat().st_size + external.bytes
    result.seconds = time.perf_counter() - start
    return result


def inspect_model(model: onnx.ModelProto, opset: int | None = None) -> ModelInspection:
    """Inspect a model in memory (module docstring); `model` is not modified.

    `opset`: preview the rules as `optimize --opset N` would run them (UsageError when it is
    below the model's opset). File sizes and external data are `inspect_path`'s.
    """
    from onnxshrink.engine.optimize import ModelSummary

    start = time.perf_counter()
    summary = ModelSummary.of(model)
    preview, rewritten, stats = _preview(model, opset)
    # the int8 plan reads the rewritten model; it is let go before the reruns at higher
    # opsets, so that at most one rewritten copy of the weights is held at a time
    plans = _int8_plans(rewritten if rewritten is not None else model)
    ops = ModelSummary.of(rewritten).ops if rewritten is not None else Counter()
    del rewritten
    if stats is not None:
        rerun = time.perf_counter()
        preview.unlocks = _unlocks(model, preview.opset, stats, ops)
        preview.seconds += time.perf_counter() - rerun
    result = ModelInspection(
        path=None,
        ir_version=model.ir_version,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        opsets={(e.domain or "ai.onnx"): e.version for e in model.opset_import},
        inputs=[_value_info(v) for v in _real_inputs(model.graph)],
        outputs=[_value_info(v) for v in model.graph.output],
        nodes=summary.nodes,
        nodes_total=summary.nodes_total,
        ops=dict(summary.ops.most_common()),
        initializers=summary.initializers,
        constants=summary.ops.get("Constant", 0),
        parameters=summary.parameters,
        bytes=model_bytes(model),
        file_bytes=None,
        external_data=ExternalData(),
        subgraphs=_subgraphs(model.graph),
        optimize=preview,
        int8=plans,
    )
    result.seconds = time.perf_counter() - start
    return result


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: not those that only list an initializer (IR < 4 style)."""
    if not graph.initializer:
        return list(graph.input)
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def _value_info(value: onnx.ValueInfoProto) -> ValueInfo:
    return ValueInfo(value.name, *_type_of(value.type))


def _type_of(tp: onnx.TypeProto) -> tuple[str, list[int | str | None] | None]:
    """(dtype, shape) of a type: the element type and dims of a tensor; a description else."""
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tensor = getattr(tp, kind)
        dtype = (
            onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
            if tensor.elem_type
            else "unknown"
        )
        if kind == "sparse_tensor_type":
            dtype = f"sparse {dtype}"
        if not tensor.HasField("shape"):
            return dtype, None
        dims: list[int | str | None] = []
        for d in tensor.shape.dim:
            which = d.WhichOneof("value")
            dims.append(
                d.dim_value
                if which == "dim_value"
                else d.dim_param
                if which == "dim_param"
                else None
            )
        return dtype, dims
    if kind == "sequence_type":
        return f"sequence({_type_of(tp.sequence_type.elem_type)[0]})", None
    if kind == "optional_type":
        return f"optional({_type_of(tp.optional_type.elem_type)[0]})", None
    if kind == "map_type":
        key = onnx.TensorProto.DataType.Name(tp.map_type.key_type).lower()
        return f"map({key}, {_type_of(tp.map_type.value_type)[0]})", None
    return kind or "unknown", None


def _subgraphs(graph: onnx.GraphProto, depth: int = 1) -> list[Subgraph]:
    """Every graph attribute of every node, outermost first, nested ones after their owner."""
    found: list[Subgraph] = []
    for node in graph.node:
        for attr in node.attribute:
            subs = (
                [attr.g]
                if attr.type == onnx.AttributeProto.GRAPH
                else list(attr.graphs)
                if attr.type == onnx.AttributeProto.GRAPHS
                else []
            )
            for i, sub in enumerate(subs):
                name = attr.name if len(subs) == 1 else f"{attr.name}[{i}]"
                nested = _subgraphs(sub, depth + 1)
                total = len(sub.node) + sum(s.nodes for s in nested)
                found.append(Subgraph(node.name, node.op_type, name, len(sub.node), total, depth))
                found.extend(nested)
    return found


def _external_data(path: Path, data_files: list[Path]) -> ExternalData:
    """Bytes on disk of each external data file, and how many tensors each holds.

    The tensors are counted on the model's structure, read again without its data (the
    loaded model no longer says which tensors came from files); a model with external data
    keeps its weights out of the .onnx, so that read is small.
    """
    structure = onnx.load(str(path), load_external_data=False)
    tensors: Counter[str] = Counter()
    for tensor in all_tensors(structure):
        if uses_external_data(tensor):
            tensors[ExternalDataInfo(tensor).location] += 1
    files = []
    for location, count in sorted(tensors.items()):
        file = path.parent / location
        size = file.stat().st_size if file.is_file() else 0
        files.append(DataFile(location, size, count))
    resolved = {(path.parent / f.location).resolve() for f in files}
    extra = [f for f in data_files if f not in resolved]  # none expected: load_model's list
    files.extend(DataFile(str(f), f.stat().st_size, 0) for f in extra if f.is_file())
    return ExternalData(sum(f.bytes for f in files), files)


def _preview(
    model: onnx.ModelProto, opset: int | None
) -> tuple[LosslessPreview, onnx.ModelProto | None, PassStats | None]:
    """Module docstring 3: the lossless pipeline on the model; the rewritten model and the
    pipeline's stats too (None when a pass failed: `preview.error` says how)."""
    from onnxshrink.engine.optimize import rewrite_model
    from onnxshrink.rules import lossless_passes

    start = time.perf_counter()
    current = default_opset(model)
    preview = LosslessPreview(opset=opset or current, nodes_before=len(model.graph.node))
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise UsageError(
            f"--opset {opset}: this onnx knows opsets up to {onnx.defs.onnx_opset_version()}"
        )
    # a wrong --opset (below the model's, or one onnx cannot convert to) is the caller's
    # error, raised as `optimize --opset` raises it
    work = convert_opset(model, opset) if opset is not None else model
    try:
        rewritten, stats = rewrite_model(work, lossless_passes())  # optimize's own pipeline
    except OnnxShrinkError as exc:
        preview.error = first_line(exc)
        return preview, None, None
    except Exception as exc:  # a pass failed on this model: the rest of the account stands
        logger.debug("lossless preview failed", exc_info=True)
        preview.error = f"{type(exc).__name__}: {first_line(exc)}"
        return preview, None, None
    preview.nodes_after = len(rewritten.graph.node)
    preview.applied = dict(stats.applied.most_common())
    preview.declined = [
        RuleDecline(rule, reason, count) for (rule, reason), count in sorted(stats.declined.items())
    ]
    preview.seconds = time.perf_counter() - start
    return preview, rewritten, stats


def _gated_rules(stats: PassStats, opset: int) -> dict[str, GatedRule]:
    """Rules that declined for the opset alone (module docstring, 4), by name."""
    gated: dict[str, GatedRule] = {}
    for (rule, site), reason in stats.decline_sites.items():
        match = _NEEDS_OPSET.search(reason)
        if match is None or int(match.group(1)) <= opset:
            continue
        entry = gated.setdefault(rule, GatedRule(rule, int(match.group(1)), 0))
        entry.needs_opset = max(entry.needs_opset, int(match.group(1)))
        if site == WHOLE_MODEL:  # declined before matching: how many would match is unknown
            entry.found = None
        elif entry.found is not None:
            entry.found += 1
    return gated


def _unlocks(
    model: onnx.ModelProto, opset: int, stats: PassStats, ops: Counter[str]
) -> list[OpsetUnlock]:
    """The preview at each opset that some rule waits for, against the preview at `opset`."""
    from onnxshrink.engine.optimize import ModelSummary, rewrite_model
    from onnxshrink.rules import lossless_passes

    gated = _gated_rules(stats, opset)
    latest = onnx.defs.onnx_opset_version()
    unlocks = []
    for target in sorted({g.needs_opset for g in gated.values()}):
        rules = [g for g in gated.values() if g.needs_opset == target]
        unlock = OpsetUnlock(target, rules)
        unlocks.append(unlock)
        if target > latest:
            unlock.error = f"this onnx knows opsets up to {latest}"
            continue
        try:
            rewritten, raised = rewrite_model(convert_opset(model, target), lossless_passes())
        except Exception as exc:  # the converter or a pass fails at that opset: say so
            unlock.error = first_line(exc)
            continue
        summary = ModelSummary.of(rewritten)
        unlock.nodes_after = summary.nodes
        for op in sorted(set(ops) | set(summary.ops)):
            change = summary.ops.get(op, 0) - ops.get(op, 0)
            if change:
                unlock.op_changes[op] = change
        for rule in rules:
            rule.fires = raised.applied.get(rule.rule, 0)
    return unlocks


def _int8_plans(model: onnx.ModelProto) -> list[TargetPlan]:
    """Module docstring 5: the int8 stage's structural plan on every target profile."""
    from onnxshrink.quant.targets import PROFILES
    from onnxshrink.rules.qdq import PER_CHANNEL_OPSET, quantizable_nodes
    from onnxshrink.rules.quantize_gather import plan_gather_tables

    gathers = None
    plans = []
    for profile in PROFILES.values():
        candidates = quantizable_nodes(model, profile.name)
        plan = TargetPlan(profile.name, len(candidates), 0, 0, 0)
        reasons: Counter[str] = Counter()
        for cand in candidates:
            if cand.quantizable:
                plan.int8_compute += 1
                continue
            if profile.weight_only and cand.weight_only_ok:
                plan.int8_weights += 1
            else:
                plan.float += 1
            assert cand.reason is not None  # not quantizable: it says why
            reasons[cand.reason] += 1
        plan.reasons = dict(reasons.most_common())
        if profile.weight_only:
            if gathers is None:  # the same tables on every target that stores weights int8
                gathers = plan_gather_tables(model)
            plan.gather_tables = len(gathers.quantized)
            plan.gather_bytes_before = gathers.bytes_before
            plan.gather_bytes_after = gathers.bytes_after
        if plan.int8_compute and profile.speed_check:
            plan.notes.append(
                "the speed check may choose float compute with int8 weights where that is faster"
            )
        if (plan.int8_compute or plan.int8_weights) and default_opset(model) < PER_CHANNEL_OPSET:
            plan.notes.append(
                f"opset raised to {PER_CHANNEL_OPSET} (per-channel DequantizeLinear needs it)"
            )
        plans.append(plan)
    return plans
