"""The pass manager reaches a fixed point, reports modification honestly, names failing passes."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

from onnxshrink.engine.passes import (
    FunctionPass,
    PassError,
    PassManager,
    PassStats,
    RuleContext,
    RulePass,
)
from onnxshrink.rules import lossless_passes
from onnxshrink.rules.noop_elimination import RULES as NOOP_RULES
from tests.helpers import apply, histogram, make_model

_CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,3] x) => (float[2,3] y) {
    a = Identity (x)
    b = Identity (a)
    c = Relu (b)
    y = Identity (c)
}
"""


def _ctx(graph: gs.Graph) -> RuleContext:
    return RuleContext(graph, graph, 13, PassStats())


def test_rule_pass_reaches_fixed_point_and_keeps_output_name():
    model = make_model(_CHAIN)
    out, stats = apply(model, RulePass("noop", NOOP_RULES))
    assert histogram(out) == {"Relu": 1}
    assert [o.name for o in out.graph.output] == ["y"]
    assert stats.applied


def test_unmodified_graph_reports_false():
    import onnx

    graph = gs.import_onnx(make_model(_CHAIN))
    calls = []

    def noop(g, ctx):
        calls.append(1)
        return False

    result = PassManager([FunctionPass("noop", noop)], max_steps=5)(graph, _ctx(graph))
    assert result.modified is False
    assert len(calls) == 1  # a sweep that changes nothing ends the loop
    assert isinstance(gs.export_onnx(result.graph), onnx.ModelProto)


def test_manager_stops_at_step_limit():
    graph = gs.import_onnx(make_model(_CHAIN))
    calls = []

    def always(g, ctx):
        calls.append(1)
        return True

    PassManager([FunctionPass("always", always)], max_steps=3)(graph, _ctx(graph))
    assert len(calls) == 3


def test_failing_pass_is_named_with_its_predecessors():
    graph = gs.import_onnx(make_model(_CHAIN))

    def boom(g, ctx):
        raise ValueError("bad rewrite")

    manager = PassManager([FunctionPass("first", lambda g, c: False), FunctionPass("boom", boom)])
    with pytest.raises(
        PassError, match=r"pass 'boom' failed \(ValueError: bad rewrite\); passes before it: first"
    ):
        manager(graph, _ctx(graph))


def test_default_pipeline_names_are_unique():
    names = [p.name for p in lossless_passes()]
    assert len(names) == len(set(names))
