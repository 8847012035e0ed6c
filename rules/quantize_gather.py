"""Store embedding tables as int8, one scale per row: Gather(T, i) -> Gather(Tq, i) * Gather(s, i).

An embedding lookup `y = Gather(T, i)` (axis 0) reads whole rows of a 2-D table `T[R, D]`. The
table is stored as int8, symmetric per row, and the lookup dequantizes only the rows it reads:

    s_r  = max_d |T[r, d]| / 127               (s_r = 1 for a row of zeros: any scale is exact)
    Tq_r = clip(round(T_r / s_r), -127, 127)     int8, |T_r - s_r Tq_r| <= s_r / 2
    y    = Cast(Gather(Tq, i), float) * Gather(s[R, 1], i)

so `y[..., d] = s_{i} Tq[i, d]`, the table row to within half a step of its own scale. The
scale Gather reads `[R, 1]`, so its output `[..., 1]` broadcasts over D in the Mul. Negative
indices pick the same row of `Tq` and `s`. The table shrinks to a quarter (plus 4 bytes per
row of scales); the work per lookup stays one row read, where a DequantizeLinear on the whole
table before the Gather would dequantize all R rows on every inference.

1. Which Gathers: in the main graph, default domain (`""` or `ai.onnx`), axis 0 (the default),
   whose data input (input 0) is a float32 initializer of the main graph that is not also a
   graph input (a caller could override it), is 2-D, has at least `min_elements` elements
   (small tables save little and cost three extra nodes), and is read by nothing else: no
   other node of any scope (a subgraph may read it too) and no graph output.
2. Declined, each with its reason in the report: nodes matched by `exclude` (a regex found in
   the node name, `re.search`, or matching the op type, `re.fullmatch`); Gathers inside
   subgraphs or in a custom domain; everything case 1 does not allow; models below opset 7
   (Mul's numpy broadcasting and Cast's integer `to` need 7 and 6).
3. Rewrite: the int8 Gather keeps the original node's name; a Gather of the scales, a Cast to
   float and the Mul are added right after it (indices are available there, so the node list
   stays topologically sorted), and the Mul writes the original output tensor, so its readers
   and any graph output see the same name, dtype and shape. New tensor and node names are
   unique in the model. The float table is dropped (nothing else read it, case 1).

Unnamed nodes are named `<op>_<index>` first (as `onnxshrink.rules.qdq` names them), so the
names in the report are the names in the returned model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.engine.io import (
    NameAllocator,
    array_of,
    graph_protos,
    named,
    named_copy,
    node_subgraphs,
)
from onnxshrink.engine.protos import compile_excludes, excluded_by, splice_nodes

logger = logging.getLogger(__name__)

#: tables with fewer elements stay float (case 1)
MIN_TABLE_ELEMENTS = 4096
#: the opset from which Mul broadcasts like numpy and Cast takes an integer `to` (case 2)
MIN_OPSET = 7
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class GatherReport:
    """What `quantize_gather_tables` did: node names quantized, and why others were not."""

    quantized: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    #: bytes of the float tables that were quantized, and of their int8 tables plus scales
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class _TableMatch:
    node: onnx.NodeProto
    index: int  # position in the main graph's node list
    table: onnx.TensorProto


def quantize_gather_tables(
    model: onnx.ModelProto,
    *,
    min_elements: int = MIN_TABLE_ELEMENTS,
    exclude: Sequence[str] = (),
) -> tuple[onnx.ModelProto, GatherReport]:
    """Store the tables of embedding Gathers as int8 per row (module docstring); `model` is kept.

    Returns a new model (`model` itself when no table qualifies) and a report listing the rewritten Gathers (by node name) and, for every
    other Gather, why it was left alone. `exclude`: regexes; a Gather is kept float when one is
    found in its name or matches its op type exactly. An invalid regex raises UsageError.
    """
    patterns = compile_excludes(exclude)
    work = named(model)  # read only until a table is found: no copy of a model without one
    report, matches = _scan(work, patterns, min_elements)
    if matches:
        if work is model:
            work = named_copy(model)
            report, matches = _scan(work, patterns, min_elements)
        _rewrite(work, matches, report)
    logger.info(
        "int8 Gather tables: %d quantized (%d -> %d bytes), %d declined",
        len(report.quantized),
        report.bytes_before,
        report.bytes_after,
        len(report.declined),
    )
    return work, report


def plan_gather_tables(
    model: onnx.ModelProto,
    *,
    min_elements: int = MIN_TABLE_ELEMENTS,
    exclude: Sequence[str] = (),
) -> GatherReport:
    """The report `quantize_gather_tables` would return, without rewriting anything.

    The same Gathers quantized and declined with the same reasons, and the same bytes (an
    int8 table of R x D bytes plus R float32 scales); nothing is copied or quantized, so a
    caller that only wants the plan (`onnxshrink inspect`) pays for none of it.
    """
    patterns = compile_excludes(exclude)
    report, matches = _scan(named(model), patterns, min_elements)
    for m in matches:
        rows, cols = (int(d) for d in m.table.dims)  # 2-D: _match checked
        report.quantized.append(m.node.name)
        report.bytes_before += rows * cols * 4
        report.bytes_after += rows * cols + rows * 4
    return report


def _scan(
    work: onnx.ModelProto, patterns: Sequence[re.Pattern[str]], min_elements: int
) -> tuple[GatherReport, list[_TableMatch]]:
    """The Gathers of `work` whose tables can be stored int8, and why the others cannot."""
    report = GatherReport()
    graph = work.graph
    matches: list[_TableMatch] = []
    opset = _default_opset(work)
    for index, node in enumerate(graph.node):
        if node.op_type != "Gather":
            continue
        reason = excluded_by(node, patterns)
        if reason is None and opset < MIN_OPSET:
            reason = f"opset {opset} < {MIN_OPSET} (Mul broadcasting)"  # case 2
        if reason is None:
            match = _match(work, node, index, min_elements)
            if isinstance(match, str):
                reason = match
            else:
                matches.append(match)
                continue
        report.declined[node.name] = reason
    for sub in (
        g for n in graph.node for g in node_subgraphs(n)
    ):  # case 2: only the main graph is rewritten
        for node in _all_nodes(sub):
            if node.op_type == "Gather":
                report.declined[node.name] = "inside a subgraph (only the main graph is rewritten)"
    return report, matches


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 table, float32 scales [R, 1]) of a 2-D table, symmetric per row (module docstring)."""
    t = np.asarray(table, dtype=np.float32)
    peak = np.abs(t).max(axis=1, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(t / scale), -127, 127).astype(np.int8)
    return q, scale


# ---------------------------------------------------------------------------------------------
# Matching (case 1, 2)
# ---------------------------------------------------------------------------------------------


def _match(
    model: onnx.ModelProto, node: onnx.NodeProto, index: int, min_elements: int
) -> _TableMatch | str:
    """The match for one main-graph Gather, or the reason it is declined (case 1)."""
    graph = model.graph
    if node.domain not in _DEFAULT_DOMAINS:
        return f"custom domain {node.domain!r}"
    if len(node.input) != 2 or len(node.output) != 1:
        return "not a 2-input, 1-output Gather"
    axis = _attr_int(node, "axis", 0)
    if axis != 0:
        return f"axis {axis} != 0 (only row lookups are rewritten)"
    name = node.input[0]
    table = next((t for t in graph.initializer if t.name == name), None)
    if table is None:
        return "table is not a constant initializer"
    if any(v.name == name for v in graph.input):
        return "table is also a graph input (a caller may override it)"
    if table.data_type != onnx.TensorProto.FLOAT:
        return f"table is {onnx.TensorProto.DataType.Name(table.data_type).lower()}, not float32"
    if len(table.dims) != 2:
        return f"table is {len(table.dims)}-D, not 2-D"
    elements = int(np.prod(table.dims))
    if elements < min_elements:
        return f"table has {elements} elements < min_elements {min_elements}"
    if any(o.name == name for o in graph.output):
        return "table is a graph output"
    readers = sum(list(n.input).count(name) for n in _all_nodes(graph))
    if readers != 1:
        return f"table is shared: read {readers} times"
    return _TableMatch(node, index, table)


# ---------------------------------------------------------------------------------------------
# Rewrite (case 3)
# ---------------------------------------------------------------------------------------------


def _rewrite(model: onnx.ModelProto, matches: list[_TableMatch], report: GatherReport) -> None:
    graph = model.graph
    names = NameAllocator(model)
    after: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    for m in matches:
        node, table_name = m.node, m.table.name
        q, scale = quantize_rows(array_of(m.table))
        q_name = names.new(f"{table_name}_int8")
        s_name = names.new(f"{table_name}_row_scale")
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
        indices, out = node.input[1], node.output[0]
        rows_q = names.new(f"{out}_int8")
        rows_f = names.new(f"{out}_rows")
        rows_s = names.new(f"{out}_scale")
        node.input[0] = q_name
        node.output[0] = rows_q
        after[m.index] = [
            helper.make_node(
                "Gather", [s_name, indices], [rows_s], name=names.new(f"{node.name}_scale")
            ),
            helper.make_node(
                "Cast",
                [rows_q],
                [rows_f],
                name=names.new(f"{node.name}_cast"),
                to=onnx.TensorProto.FLOAT,
            ),
            helper.make_node(
                "Mul", [rows_f, rows_s], [out], name=names.new(f"{node.name}_dequant")
            ),
        ]
        dropped.add(table_name)
        report.quantized.append(node.name)
        report.bytes_before += int(np.prod(m.table.dims)) * 4
        report.bytes_after += int(q.nbytes + scale.nbytes)
        logger.debug("int8 rows for %s (%s %s)", node.name, table_name, list(m.table.dims))

    splice_nodes(graph, after, new_inits, dropped)


# ---------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 1


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs, at any depth."""
    for g in graph_protos(graph):
        yield from g.node
