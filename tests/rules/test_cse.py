"""Tests for rules/cse.py: identical nodes are computed once."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink.engine.passes import PassStats, RuleContext
from onnxshrink.rules.cse import eliminate_common_subexpressions as cse
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model


def _model(body: str, outputs: str = "float[2,3] y", opset: int = 14, **inits):
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
g (float[2,3] x) => ({outputs}) {{
{body}
}}"""
    return make_model(text, inits)


def test_identical_nodes_are_merged():
    before = _model("a = Relu(x)\n b = Relu(x)\n y = Add(a, b)")
    after, stats = apply(before, cse)
    assert stats.applied["eliminate_common_subexpressions"] == 1
    assert_rewritten(before, after, {"Relu": 1, "Add": 1})


def test_duplicated_chains_collapse_in_one_sweep():
    before = _model("a = Relu(x)\n b = Relu(x)\n c = Sigmoid(a)\n d = Sigmoid(b)\n y = Mul(c, d)")
    graph = gs.import_onnx(before)
    assert cse(graph, RuleContext(graph, graph, 14, PassStats())) is True
    graph.cleanup()
    assert sorted(n.op for n in graph.nodes) == ["Mul", "Relu", "Sigmoid"]
    after, _ = apply(before, cse)
    assert_rewritten(before, after, {"Relu": 1, "Sigmoid": 1, "Mul": 1})


def test_constants_with_equal_values_count_as_the_same_input():
    k = np.arange(3, dtype=np.float32)
    before = _model("a = Mul(x, k1)\n b = Mul(x, k2)\n y = Sub(a, b)", k1=k, k2=k.copy())
    after, _ = apply(before, cse)
    assert_rewritten(before, after, {"Mul": 1, "Sub": 1})


def test_large_equal_constants_count_as_the_same_input():
    k = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,64] x) => (float[2,3] y) {
    a = MatMul(x, k1)
    b = MatMul(x, k2)
    y = Add(a, b)
}"""
    before = make_model(text, {"k1": k, "k2": k.copy()})
    after, _ = apply(before, cse)
    assert_rewritten(before, after, {"MatMul": 1, "Add": 1})


def test_different_attributes_are_kept():
    before = _model("a = LeakyRelu<alpha = 0.1>(x)\n b = LeakyRelu<alpha = 0.2>(x)\n y = Add(a, b)")
    after, _ = apply(before, cse)
    assert_unchanged(before, after)


def test_different_constant_values_are_kept():
    before = _model(
        "a = Mul(x, k1)\n b = Mul(x, k2)\n y = Sub(a, b)",
        k1=np.zeros(3, np.float32),
        k2=np.array([0.0, -0.0, 0.0], np.float32),  # -0.0: other bytes
    )
    after, _ = apply(before, cse)
    assert_unchanged(before, after)


def test_different_inputs_are_kept():
    before = _model("a = Relu(x)\n n = Neg(x)\n b = Relu(n)\n y = Add(a, b)")
    after, _ = apply(before, cse)
    assert_unchanged(before, after)


def test_nondeterministic_ops_are_kept():
    before = _model("a = RandomUniformLike(x)\n b = RandomUniformLike(x)\n y = Sub(a, b)")
    after, stats = apply(before, cse)
    assert histogram(after) == {"RandomUniformLike": 2, "Sub": 1}
    assert stats.applied["eliminate_common_subexpressions"] == 0


def test_custom_domain_is_kept():
    text = """<ir_version: 10, opset_import: ["" : 14, "com.custom" : 1]>
g (float[2,3] x) => (float[2,3] y) {
    a = com.custom.Op(x)
    b = com.custom.Op(x)
    y = Add(a, b)
}"""
    before = make_model(text)
    graph = gs.import_onnx(before)
    assert cse(graph, RuleContext(graph, graph, 14, PassStats())) is False


def test_both_outputs_graph_outputs_keep_both_nodes():
    before = _model("y = Relu(x)\n z = Relu(x)", outputs="float[2,3] y, float[2,3] z")
    after, _ = apply(before, cse)
    assert_rewritten(before, after, {"Relu": 2})


def test_duplicate_writing_a_graph_output_hands_it_to_the_kept_node():
    before = _model(
        "a = Relu(x)\n s = Sigmoid(a)\n z = Relu(x)\n y = Add(s, z)",
        outputs="float[2,3] y, float[2,3] z",
    )
    after, _ = apply(before, cse)
    assert_rewritten(before, after, {"Relu": 1, "Sigmoid": 1, "Add": 1})
    relu = next(n for n in after.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["z"]


def test_nodes_with_subgraphs_are_kept():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[2,3] x) => (float[2,3] y) {
    a = If(cond) <
        then_branch = t1 () => (float[2,3] r1) { r1 = Relu(x) },
        else_branch = e1 () => (float[2,3] s1) { s1 = Neg(x) }
    >
    b = If(cond) <
        then_branch = t2 () => (float[2,3] r2) { r2 = Relu(x) },
        else_branch = e2 () => (float[2,3] s2) { s2 = Neg(x) }
    >
    y = Add(a, b)
}"""
    before = make_model(text)
    after, _ = apply(before, cse)
    assert histogram(after) == {"If": 2, "Add": 1}


def test_duplicates_inside_if_branch_are_merged():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[2,3] x) => (float[2,3] y) {
    y = If(cond) <
        then_branch = then_g () => (float[2,3] t) {
            a = Relu(x)
            b = Relu(x)
            t = Add(a, b)
        },
        else_branch = else_g () => (float[2,3] e) { e = Neg(x) }
    >
}"""
    before = make_model(text)
    after, _ = apply(before, cse)
    assert histogram(after, recurse=True) == {"If": 1, "Relu": 1, "Add": 1, "Neg": 1}
    feeds = {"cond": np.array(True), "x": np.arange(6, dtype=np.float32).reshape(2, 3) - 3}
    assert_rewritten(before, after, {"If": 1}, feeds=feeds)
