"""Where the error enters: compare the intermediate tensors of a reference and a candidate model.

1. Comparable tensors. A tensor of the candidate's main graph is compared when it is the output
   of a node, is a float tensor (by shape inference; where inference cannot tell, by the array
   ONNX Runtime returns), is not computed from constants alone (weights and their derived
   values, e.g. a Constant or a DequantizeLinear of an int8 weight: comparing those would blame
   the weight instead of the layer that uses it), and the reference has a non-constant node
   output of the same name with the same shape. Graph inputs, initializers and tensors inside
   subgraphs (If/Loop/Scan bodies) are never compared.
   1b. A name is not proof of identity: a rewrite may keep a name for a new value (folding a
   BatchNormalization into a Conv keeps the Conv's output name for what was the BN's output).
   A match (by name, or across a Q/DQ pair) whose error exceeds SUSPICIOUS_ERROR (or whose
   shape differs) is compared, on the first sample, with every reference tensor of its shape;
   the nearest by noise-to-signal ratio takes its place (`matched_by="value"`) when its ratio
   is within MATCH_NSR and TWIN_MARGIN times below the match's. This matters most for a
   quantized candidate of an optimized model: without it every folded Conv is compared with
   the unfolded value of its name, and the cut run (3) feeds its consumers that wrong value,
   so they "add" errors far above their own and their inputs' (1e2 and more, or, on an int8
   PP-OCRv4 det, 2.0 for a Conv whose plain error was 0.08). The bounds are relative because
   a tensor deep in an int8 network carries the error of every quantized layer before it: on
   that detector the folded depthwise Convs were 4e-3 to 1.2e-2 from their twins and 0.3 to
   0.5 from the tensors of their name, so an absolute bound of 1e-2 with a margin of 100 (the
   first version) missed them. A candidate with a real error of its own is matched to its twin
   the same way, and its error against the twin is what is reported. A DequantizeLinear
   across a Q/DQ pair whose source was matched by value follows its source (2).
2. Across Q/DQ pairs. When the candidate has `X -> QuantizeLinear -> DequantizeLinear -> X_dq`
   and the reference has a float tensor `X` (a node output or a graph input), `X_dq` is
   compared with the reference's `X`: the dequantized value against the float tensor it
   replaced. A DequantizeLinear output whose own name is in the reference is compared by name.
3. Two figures per tensor, both the relative error `max|cand - ref| / max|ref|` (worst sample):
   - `error`: in a plain run of both models (what the candidate computes end to end);
   - `added`: in a run of the candidate cut at every comparable tensor: each consumer of a
     comparable tensor reads the reference's value of it instead (fed as an extra input), so a
     node's output shows only the error that the node itself (or, where its inputs are not
     comparable, the nodes back to the nearest comparable tensors: `span` counts them)
     introduces. Consumers inside subgraphs keep reading the candidate's own value.
4. Ranking. Nodes are ranked by the cut run's noise-to-signal ratio (`added_nsr`, `sum (cand -
   ref)^2 / sum ref^2`, worst sample; the budget's measure), then by `added`. Not by the max
   relative error: calibration clips a few outliers of a quantized activation (2e-5 of the
   elements on an int8 PP-OCRv4 det), which puts its DequantizeLinear's max error near 0.5
   while its noise-to-signal ratio is 1e-4, and ranked those first. The issue's first idea, `error` at the output minus
   the largest `error` at the inputs, is also reported (`input_error`, `delta`), but it does not
   rank by itself: error grows through later nonlinear layers (a Clip near its bounds, Softmax,
   mean subtraction), so on PP-OCRv4 rec with one Conv weight scaled by 1.01 the subtraction
   ranked that Conv first for 3 of the 38 Convs, while the cut run ranks it first for every
   one. For `input_error`, an input that is not comparable counts as the largest error among
   its nearest comparable ancestors (0 for graph inputs and constants): counting it as 0 would
   blame the first comparable node after a renamed stretch for everything upstream.
5. Unchanged nodes are not ranked. A candidate node that computes what a reference node does
   (same op and attributes, the same inputs through the pairing, equal constant inputs: a
   layer a lossy stage kept float, or one no rule touched) cannot add error of its own; in the
   cut run its output is the reference's up to float rounding. It is left out of the ranking
   (`unchanged` counts such nodes), so that what is ranked is what changed.

Three sessions: the reference with every float intermediate as a graph output, the candidate
with every paired tensor as one, and the cut candidate; each runs once per sample. Per sample,
the arrays are reduced to figures at once; the reference's intermediates are held until the
cut run has used them (peak memory: one sample's intermediates of the reference plus those of
the candidate). Models over 2 GB (which protobuf cannot serialize) are not supported here.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxshrink.engine.io import graph_protos, with_outputs
from onnxshrink.errors import TimeLimitError
from onnxshrink.verify.parity import (
    DEFAULT_TIME_LIMIT,
    Progress,
    jsonable,
    ort_session,
    relative_error,
    run_with_limit,
)

logger = logging.getLogger(__name__)

DEFAULT_TOP = 10
DEFAULT_SAMPLES = 2
# A name match farther off than float32 noise may be a different tensor under a reused name
# (case 1b): a fold whose scale is close to 1 moves a tensor by as little as 1e-4.
SUSPICIOUS_ERROR = 1e-6
# The noise-to-signal ratio within which a reference tensor can be the same value (case 1b):
# 0.1 is a 32% RMS difference, above what the int8 error accumulated through a network reaches
# where its output is still usable (a cosine of 0.95 is a ratio of about 0.1), and well below
# what a different tensor of the same shape gives (0.3 and more for a pre-fold value).
MATCH_NSR = 0.1
# How many times nearer (in noise-to-signal ratio, 10 is about 3 times in RMS) the value match
# must be than the match it replaces (case 1b).
TWIN_MARGIN = 10.0

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass
class NodeError:
    """One candidate node's error figures (see the module docstring, 3 and 4)."""

    node: str
    op_type: str
    output: str
    reference: str
    error: float
    input_error: float
    added: float
    max_abs: float
    matched_by: str = "name"
    span: int = 1
    #: the cut run's noise-to-signal ratio `sum (cand-ref)^2 / sum ref^2` (worst sample): what
    #: ranks (4); nan without a cut run
    added_nsr: float = math.nan

    @property
    def delta(self) -> float:
        """Error at the output minus the largest error at the inputs."""
        return self.error - self.input_error


@dataclass
class Localization:
    """Ranked nodes (largest `added` first) and what could and could not be compared."""

    nodes: list[NodeError] = field(default_factory=list)
    compared: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    reason: str | None = None
    rematched: int = 0
    #: candidate nodes left out of the ranking: they compute what the reference's node does (5)
    unchanged: int = 0

    def top(self, k: int = DEFAULT_TOP) -> list[NodeError]:
        """The first `k` ranked nodes."""
        return self.nodes[:k]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """JSON-ready figures (all ranked nodes unless `top`)."""
        nodes = self.nodes if top is None else self.nodes[:top]
        return jsonable(
            {
                "samples": self.samples,
                "compared_tensors": self.compared,
                "matched_by_value": self.rematched,
                "unchanged_nodes": self.unchanged,
                "skipped_tensors": dict(self.skipped),
                "reason": self.reason,
                "ranked_by": "added",
                "nodes": [{**vars(n), "delta": n.delta} for n in nodes],
            }
        )


@dataclass
class _Graph:
    model: onnx.ModelProto
    producer: dict[str, int]
    inputs: set[str]
    constant: set[str]
    elem_type: dict[str, int]
    subgraph_outputs: int

    @property
    def nodes(self):
        return self.model.graph.node

    def is_float(self, name: str) -> bool | None:
        """True/False by shape inference, None when unknown."""
        t = self.elem_type.get(name)
        return None if not t else t in _FLOAT_TYPES


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def _count_subgraph_outputs(graph: onnx.GraphProto) -> int:
    subgraphs = list(graph_protos(graph))[1:]
    return sum(len([o for o in n.output if o]) for sub in subgraphs for n in sub.node)


def _graph_info(model: onnx.ModelProto) -> _Graph:
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {v.name for v in graph.input if v.name not in initializers}
    producer: dict[str, int] = {}
    constant = set(initializers)
    for i, node in enumerate(graph.node):
        ins = [n for n in node.input if n]
        # A node with a subgraph may read graph inputs implicitly; never call it constant.
        is_const = not _has_subgraph(node) and all(n in constant for n in ins)
        for out in node.output:
            if out:
                producer[out] = i
                if is_const:
                    constant.add(out)
    elem_type: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        values = list(inferred.graph.value_info) + list(inferred.graph.output)
    except Exception as exc:  # too large, or an op inference does not know
        logger.info("shape inference failed (%s); tensor types come from ONNX Runtime", exc)
        values = list(graph.value_info) + list(graph.output)
    for v in list(values) + list(graph.input):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            elem_type[v.name] = v.type.tensor_type.elem_type
        elif v.type.WhichOneof("value") is not None:
            elem_type[v.name] = -1  # a sequence, map or optional: not a tensor to compare
    return _Graph(
        model, producer, inputs, constant, elem_type, _count_subgraph_outputs(model.graph)
    )


def _pair_tensors(ref: _Graph, cand: _Graph) -> tuple[dict[str, tuple[str, str]], Counter[str]]:
    """Candidate tensor -> (reference tensor, how matched) for every comparable pair (case 1, 2).

    How: "name", or "dequantize" for a DequantizeLinear output (by name or across a Q/DQ pair).
    """
    pairs: dict[str, tuple[str, str]] = {}
    skipped: Counter[str] = Counter()
    if cand.subgraph_outputs:
        skipped["inside a subgraph"] += cand.subgraph_outputs

    def ref_float_tensor(name: str, allow_input: bool) -> bool:
        if name in ref.producer:
            return name not in ref.constant and ref.is_float(name) is not False
        return allow_input and name in ref.inputs and ref.is_float(name) is not False

    for node in cand.nodes:
        for out in node.output:
            if not out:
                continue
            if out in cand.constant:
                skipped["computed from constants only"] += 1
                continue
            if cand.is_float(out) is False:
                skipped["not a float tensor"] += 1
                continue
            if ref_float_tensor(out, allow_input=False):
                pairs[out] = (out, "dequantize" if node.op_type == "DequantizeLinear" else "name")
                continue
            if node.op_type == "DequantizeLinear" and node.input:
                q = cand.producer.get(node.input[0])
                if q is not None and cand.nodes[q].op_type == "QuantizeLinear":
                    source = cand.nodes[q].input[0]
                    if ref_float_tensor(source, allow_input=True):
                        pairs[out] = (source, "dequantize")
                        continue
            if out in ref.producer and ref.is_float(out) is False:
                skipped["not a float tensor"] += 1
            else:
                skipped["not in the reference"] += 1
    return pairs, skipped


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> bytes:
    """A serialized copy of `model` with `names` added as graph outputs (types left to ORT)."""
    return with_outputs(model, names).SerializeToString()


def _cut_model(
    model: onnx.ModelProto, cut: dict[str, str], elem_types: Mapping[str, int], outputs: list[str]
) -> bytes:
    """The candidate whose consumers of each tensor in `cut` read a new input instead (case 3)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        for k, name in enumerate(node.input):
            if name in cut:
                node.input[k] = cut[name]
    for name, new in cut.items():
        copy.graph.input.append(onnx.helper.make_tensor_value_info(new, elem_types[name], None))
    del copy.graph.output[:]
    for name in outputs:
        copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy.SerializeToString()


def _unique_name(base: str, taken: set[str]) -> str:
    name = f"{base}::reference"
    i = 1
    while name in taken:
        name = f"{base}::reference{i}"
        i += 1
    taken.add(name)
    return name


def _all_names(model: onnx.ModelProto) -> set[str]:
    names = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        names.update(node.output)
    return names


def localize(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    samples: int = DEFAULT_SAMPLES,
    progress: Progress | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> Localization:
    """Rank the candidate's nodes by the error they add (module docstring); never raises for ORT
    but one: a run longer than `time_limit` seconds raises TimeLimitError (`run_with_limit`).

    Uses the first `samples` feeds. When nothing can be compared, or ONNX Runtime cannot run the
    augmented models, the result has no nodes and says why in `reason`.
    """
    ref = _graph_info(reference)
    cand = _graph_info(candidate)
    pairs, skipped = _pair_tensors(ref, cand)
    result = Localization(skipped=skipped)
    if not pairs:
        result.reason = "no intermediate tensor of the candidate exists in the reference"
        return result
    # Every float tensor of the reference, not only the name matches: a name match whose value
    # is far off may find its real counterpart by value (case 3 of the module docstring).
    ref_names = [
        o
        for node in ref.nodes
        for o in node.output
        if o and o not in ref.constant and ref.is_float(o) is not False
    ]
    cand_names = list(pairs)
    try:
        ref_sess = ort_session(_with_outputs(reference, ref_names))
        cand_sess = ort_session(_with_outputs(candidate, cand_names))
    except Exception as exc:
        result.reason = f"ONNX Runtime cannot load the models with intermediate outputs: {exc}"
        return result

    errors: dict[str, float] = {}
    max_abs: dict[str, float] = {}
    added: dict[str, float] = {}
    added_nsr: dict[str, float] = {}
    usable: list[str] | None = None
    cut_sess = None
    cut: dict[str, str] = {}
    cut_failed = False
    feeds = list(_take(feeds, samples))
    for index, feed in enumerate(feeds):
        where = f"localization, input {index + 1}"
        try:
            ref_out = run_with_limit(
                ref_sess, ref_names, feed, time_limit, f"the reference model, {where}"
            )
            ref_vals = dict(zip(ref_names, ref_out, strict=True))
            cand_out = run_with_limit(
                cand_sess, cand_names, feed, time_limit, f"the candidate model, {where}"
            )
            cand_vals = dict(zip(cand_names, cand_out, strict=True))
            del ref_out, cand_out
        except TimeLimitError:
            raise
        except Exception as exc:
            result.reason = f"ONNX Runtime fails on the models with intermediate outputs: {exc}"
            return result
        ref_vals.update({k: np.asarray(v) for k, v in feed.items() if k in ref.inputs})
        if usable is None:
            usable, reshaped = _usable_pairs(pairs, ref_vals, cand_vals, result.skipped)
            result.rematched = _rematch_by_value(cand, pairs, usable, reshaped, ref_vals, cand_vals)
            for name in reshaped:
                if pairs[name][1] == "value":
                    usable.append(name)
                else:
                    result.skipped["shape differs"] += 1
            if not usable:
                result.reason = "no intermediate tensor of the candidate matches the reference"
                return result
            cut_sess, cut = _cut_session(candidate, cand, usable, cand_vals)
            cut_failed = cut_sess is None
        dtypes = {name: cand_vals[name].dtype for name in usable}
        for name in usable:
            r, c = ref_vals[pairs[name][0]], cand_vals[name]
            a, e = relative_error(r, c)
            errors[name] = max(errors.get(name, 0.0), e)
            max_abs[name] = max(max_abs.get(name, 0.0), a)
        del cand_vals
        if cut_sess is not None:
            cut_feed = dict(feed)
            for name, new in cut.items():
                cut_feed[new] = np.asarray(ref_vals[pairs[name][0]]).astype(dtypes[name])
            try:
                cut_vals = run_with_limit(
                    cut_sess, usable, cut_feed, time_limit, f"the cut candidate, {where}"
                )
            except TimeLimitError:
                raise
            except Exception as exc:
                logger.warning("the cut candidate fails (%s); ranking by error growth", exc)
                cut_sess, cut_failed = None, True
            else:
                for name, c in zip(usable, cut_vals, strict=True):
                    _, e = relative_error(ref_vals[pairs[name][0]], c)
                    added[name] = max(added.get(name, 0.0), e)
                    nsr = _nsr(ref_vals[pairs[name][0]], c)
                    added_nsr[name] = max(added_nsr.get(name, 0.0), nsr)
            del cut_feed
        del ref_vals
        result.samples = index + 1
        if progress is not None:
            progress(index + 1, len(feeds))
    if usable is None:
        result.reason = "no inputs to localize on"
        return result
    result.compared = len(usable)
    result.nodes = _rank(
        cand,
        pairs,
        usable,
        errors,
        max_abs,
        None if cut_failed else added,
        None if cut_failed else added_nsr,
    )
    same = _unchanged_nodes(ref, cand, pairs)
    ranked = [n for n in result.nodes if n.node not in same]
    result.unchanged = len(result.nodes) - len(ranked)
    result.nodes = ranked
    return result


def _take(feeds: Iterable[dict[str, np.ndarray]], n: int):
    for i, feed in enumerate(feeds):
        if i >= n:
            return
        yield feed


def _usable_pairs(
    pairs: dict[str, tuple[str, str]],
    ref_vals: dict[str, np.ndarray],
    cand_vals: dict[str, np.ndarray],
    skipped: Counter[str],
) -> tuple[list[str], list[str]]:
    """(float pairs of the same shape, float pairs whose shapes differ) on the first sample."""
    usable, reshaped = [], []
    for name, (ref_name, _) in pairs.items():
        r, c = np.asarray(ref_vals[ref_name]), np.asarray(cand_vals[name])
        if not (np.issubdtype(r.dtype, np.floating) and np.issubdtype(c.dtype, np.floating)):
            skipped["not a float tensor"] += 1
        elif r.shape != c.shape:
            reshaped.append(name)
        else:
            usable.append(name)
    return usable, reshaped


def _rematch_by_value(
    cand: _Graph,
    pairs: dict[str, tuple[str, str]],
    usable: list[str],
    reshaped: list[str],
    ref_vals: dict[str, np.ndarray],
    cand_vals: dict[str, np.ndarray],
) -> int:
    """Re-pair matches whose value belongs to another reference tensor (case 1b).

    Returns how many pairs changed. Pairs matched by name or across a Q/DQ pair whose error is
    above SUSPICIOUS_ERROR, or whose shape differs, are looked at; the reference tensor of the
    same shape with the least noise-to-signal ratio `sum (c-r)^2 / sum r^2` replaces the match
    when that ratio is at most MATCH_NSR and at most 1/TWIN_MARGIN of the match's. The ratio,
    not the max relative error, because a quantized tensor is near its twin on average but not
    at its worst element (clipped outliers). Exact necessary conditions on the RMS and the mean
    (`|rms(c) - rms(r)|` and `|mean(c) - mean(r)|` are at most `rms(c - r)`) rule out most
    reference tensors before their ratio is computed. Then a DequantizeLinear across a Q/DQ
    pair whose source was re-paired, and that was not itself, follows its source.
    """
    suspects = [(name, math.inf) for name in reshaped if pairs[name][1] in ("name", "dequantize")]
    for name in usable:
        ref_name, how = pairs[name]
        if how not in ("name", "dequantize"):
            continue
        _, error = relative_error(ref_vals[ref_name], cand_vals[name])
        if error > SUSPICIOUS_ERROR:
            suspects.append((name, _nsr(ref_vals[ref_name], cand_vals[name])))
    if not suspects:
        return 0
    by_shape: dict[tuple, list[tuple[str, float, float]]] = {}
    for ref_name, value in ref_vals.items():
        value = np.asarray(value)
        if value.size and np.issubdtype(value.dtype, np.floating):
            rms, mean = _fingerprint(value)
            if math.isfinite(rms) and rms > 0:
                by_shape.setdefault(value.shape, []).append((ref_name, rms, mean))
    changed = 0
    for name, nsr in suspects:
        value = np.asarray(cand_vals[name])
        rms, mean = _fingerprint(value)
        limit = min(MATCH_NSR, nsr / TWIN_MARGIN)
        best, best_nsr = None, math.inf
        for ref_name, ref_rms, ref_mean in by_shape.get(value.shape, []):
            slack = math.sqrt(limit) * ref_rms  # the largest rms(c - r) within the limit
            if abs(ref_rms - rms) > slack or abs(ref_mean - mean) > slack:
                continue
            e = _nsr(ref_vals[ref_name], value)
            if e <= limit and e < best_nsr:
                best, best_nsr = ref_name, e
        if best is not None and best != pairs[name][0]:
            logger.info("%s: matches reference %s by value (NSR %.2e)", name, best, best_nsr)
            pairs[name] = (best, "value")
            changed += 1
    for name, _ in suspects:
        source = _quantize_source(cand, name)
        if pairs[name][1] != "value" and source in pairs and pairs[source][1] == "value":
            logger.info("%s: follows its source %s to %s", name, source, pairs[source][0])
            pairs[name] = (pairs[source][0], "value")
            changed += 1
    return changed


def _quantize_source(cand: _Graph, name: str) -> str | None:
    """X when `name` is the output of `X -> QuantizeLinear -> DequantizeLinear`, else None."""
    index = cand.producer.get(name)
    if index is None or cand.nodes[index].op_type != "DequantizeLinear":
        return None
    q = cand.producer.get(cand.nodes[index].input[0])
    if q is None or cand.nodes[q].op_type != "QuantizeLinear":
        return None
    return cand.nodes[q].input[0]


def _nsr(ref: np.ndarray, cand: np.ndarray) -> float:
    """`sum (cand - ref)^2 / sum ref^2` in float64 (inf for other shapes or a zero `ref`)."""
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if r.shape != c.shape:
        return math.inf
    signal = float(np.sum(r * r))
    noise = float(np.sum((c - r) ** 2))
    if not (math.isfinite(signal) and math.isfinite(noise)) or signal == 0:
        return 0.0 if noise == 0 else math.inf
    return noise / signal


def _fingerprint(value: np.ndarray) -> tuple[float, float]:
    """(RMS, mean) in float64."""
    as64 = value.astype(np.float64, copy=False)
    return math.sqrt(float(np.mean(as64 * as64))), float(np.mean(as64))


def _cut_session(
    candidate: onnx.ModelProto,
    cand: _Graph,
    usable: list[str],
    cand_vals: dict[str, np.ndarray],
):
    """The cut candidate's session and its tensor -> new input map (None when ORT refuses it)."""
    consumed = {n for node in cand.nodes for n in node.input if n}
    taken = _all_names(candidate)
    cut = {name: _unique_name(name, taken) for name in usable if name in consumed}
    elem_types = {
        name: onnx.helper.np_dtype_to_tensor_dtype(np.asarray(cand_vals[name]).dtype)
        for name in cut
    }
    try:
        return ort_session(_cut_model(candidate, cut, elem_types, usable)), cut
    except Exception as exc:
        logger.warning("ONNX Runtime cannot load the cut candidate (%s); ranking by growth", exc)
        return None, cut


def _unchanged_nodes(ref: _Graph, cand: _Graph, pairs: dict[str, tuple[str, str]]) -> set[str]:
    """Names (as `_rank` writes them) of candidate nodes that compute what a reference node does
    (case 5): same op, domain and attributes, each input the reference node's own (through the
    pairing) or a constant initializer with the same values, each output paired with the
    reference node's output at the same position."""
    ref_init = {t.name: t for t in ref.model.graph.initializer}
    cand_init = {t.name: t for t in cand.model.graph.initializer}

    def same_input(c: str, r: str) -> bool:
        if not c or not r:
            return c == r
        if c in pairs:
            return pairs[c][0] == r
        if c in cand.inputs or r in ref.inputs:
            return c == r and c in cand.inputs and r in ref.inputs
        if c in cand_init and r in ref_init:
            a, b = cand_init[c], ref_init[r]
            if a.data_type != b.data_type or list(a.dims) != list(b.dims):
                return False
            x, y = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
            return bool(np.array_equal(x, y, equal_nan=True))
        if c in cand.constant and r in ref.constant and c in cand.producer and r in ref.producer:
            a_node, b_node = cand.nodes[cand.producer[c]], ref.nodes[ref.producer[r]]
            return a_node.op_type == b_node.op_type == "Constant" and _attributes(
                a_node
            ) == _attributes(b_node)
        return False

    same: set[str] = set()
    for index, node in enumerate(cand.nodes):
        outs = [o for o in node.output if o in pairs]
        if not outs or _has_subgraph(node):
            continue
        ref_index = ref.producer.get(pairs[outs[0]][0])
        if ref_index is None:
            continue
        other = ref.nodes[ref_index]
        if (
            other.op_type != node.op_type
            or other.domain != node.domain
            or len(other.input) != len(node.input)
            or len(other.output) != len(node.output)
            or _attributes(other) != _attributes(node)
        ):
            continue
        outputs = zip(node.output, other.output, strict=True)  # same count, checked above
        if any(o in pairs and pairs[o][0] != r for o, r in outputs):
            continue
        if all(same_input(c, r) for c, r in zip(node.input, other.input, strict=True)):
            same.add(node.name or f"<{node.op_type} #{index}>")
    return same


def _attributes(node: onnx.NodeProto) -> list[bytes]:
    return sorted(a.SerializeToString(deterministic=True) for a in node.attribute)


def _rank(
    cand: _Graph,
    pairs: dict[str, tuple[str, str]],
    usable: list[str],
    errors: dict[str, float],
    max_abs: dict[str, float],
    added: dict[str, float] | None,
    added_nsr: dict[str, float] | None = None,
) -> list[NodeError]:
    compared = set(usable)
    # Error reaching each tensor: its own when compared, else the largest among its nearest
    # compared ancestors (graph order is topological).
    inherited: dict[str, float] = {}
    for node in cand.nodes:
        upstream = max((inherited.get(n, 0.0) for n in node.input if n), default=0.0)
        for out in node.output:
            if out:
                inherited[out] = errors[out] if out in compared else upstream
    rows: list[NodeError] = []
    for index, node in enumerate(cand.nodes):
        outs = [o for o in node.output if o in compared]
        if not outs:
            continue
        key = added_nsr if added_nsr else added if added is not None else errors
        out = max(outs, key=lambda o: key.get(o, 0.0))
        input_error = max((inherited.get(n, 0.0) for n in node.input if n), default=0.0)
        rows.append(
            NodeError(
                node=node.name or f"<{node.op_type} #{index}>",
                op_type=node.op_type,
                output=out,
                reference=pairs[out][0],
                error=errors[out],
                input_error=input_error,
                added=added.get(out, math.nan) if added is not None else math.nan,
                max_abs=max_abs[out],
                matched_by=pairs[out][1],
                span=_span(cand, node, compared),
                added_nsr=added_nsr.get(out, math.nan) if added_nsr else math.nan,
            )
        )
    if added_nsr:
        rows.sort(key=lambda r: (-r.added_nsr, -r.added, -r.error))
    elif added is not None:
        rows.sort(key=lambda r: (-r.added, -r.error))
    else:
        rows.sort(key=lambda r: (-r.delta, -r.error))
    return rows


def _span(cand: _Graph, node: onnx.NodeProto, compared: set[str]) -> int:
    """Nodes between this one and the nearest compared tensors, this one included."""
    seen: set[int] = set()
    stack = [node]
    count = 0
    while stack:
        current = stack.pop()
        count += 1
        for name in current.input:
            if not name or name in compared or name in cand.constant:
                continue
            index = cand.producer.get(name)
            if index is not None and index not in seen:
                seen.add(index)
                stack.append(cand.nodes[index])
    return count
