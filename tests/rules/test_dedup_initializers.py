"""Tests for rules/dedup_initializers.py: identical constants share one tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.engine.passes import PassStats, RuleContext
from onnxshrink.rules.dead_code import constants_to_initializers
from onnxshrink.rules.dedup_initializers import deduplicate_initializers as dedup
from tests.helpers import apply, assert_rewritten, make_model

TWO_WEIGHTS = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,8] x) => (float[2,8] y) {
    a = MatMul(x, w1)
    b = MatMul(x, w2)
    y = Add(a, b)
}"""


def _names(model: onnx.ModelProto) -> list[str]:
    return sorted(i.name for i in model.graph.initializer)


def test_identical_weights_share_one_initializer():
    w = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    before = make_model(TWO_WEIGHTS, {"w1": w, "w2": w.copy()})
    after, stats = apply(before, dedup)
    assert stats.applied["deduplicate_initializers"] == 1
    assert _names(after) == ["w1"]
    assert after.ByteSize() < before.ByteSize() - w.nbytes // 2
    assert_rewritten(before, after, {"MatMul": 2, "Add": 1})


def test_first_run_changes_second_does_not():
    w = np.ones((8, 8), np.float32)
    graph = gs.import_onnx(make_model(TWO_WEIGHTS, {"w1": w, "w2": w.copy()}))
    ctx = RuleContext(graph, graph, 14, PassStats())
    assert dedup(graph, ctx) is True
    assert dedup(graph, ctx) is False


def test_different_values_are_kept():
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 8)).astype(np.float32)
    w2 = w1.copy()
    w2[7, 7] += 1.0
    before = make_model(TWO_WEIGHTS, {"w1": w1, "w2": w2})
    after, _ = apply(before, dedup)
    assert _names(after) == ["w1", "w2"]


def test_same_bytes_other_shape_or_dtype_are_kept():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[4] x, int32[4] i) => (float[1,4] y, int32[4] j) {
    a = Add(x, k1)
    y = Add(a, k2)
    j = Add(i, k3)
}"""
    zeros = np.zeros(4, np.float32)
    before = make_model(text, {"k1": zeros, "k2": zeros.reshape(1, 4), "k3": np.zeros(4, np.int32)})
    after, _ = apply(before, dedup)
    assert _names(after) == ["k1", "k2", "k3"]


def test_negative_zero_is_not_zero():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2] x) => (float[2] y) {
    a = Div(x, k1)
    y = Add(a, k2)
}"""
    before = make_model(
        text, {"k1": np.array([1.0, 0.0], np.float32), "k2": np.array([1.0, -0.0], np.float32)}
    )
    after, _ = apply(before, dedup)
    assert _names(after) == ["k1", "k2"]


def test_constants_in_both_branches_are_merged():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[4] x) => (float[4] y) {
    y = If(cond) <
        then_branch = then_g () => (float[4] t) {
            k1 = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
            t = Mul(x, k1)
        },
        else_branch = else_g () => (float[4] e) {
            k2 = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
            e = Add(x, k2)
        }
    >
}"""
    before = make_model(text)
    after, stats = apply(before, [constants_to_initializers, dedup])
    assert stats.applied["deduplicate_initializers"] == 1
    branches = {a.name: a.g for a in after.graph.node[0].attribute}
    # One copy, stored in the innermost graph enclosing both readers (the main graph).
    assert [i.name for i in after.graph.initializer] == ["k1"]
    assert not branches["then_branch"].initializer and not branches["else_branch"].initializer
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.arange(4, dtype=np.float32)}
        assert_rewritten(before, after, {"If": 1}, feeds=feeds)


def test_keeper_name_taken_in_the_readers_graph_is_not_used():
    # Sibling branches may reuse a name: "k" is a constant in one and an activation in the other.
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[4] x) => (float[4] y) {
    y = If(cond) <
        then_branch = then_g () => (float[4] t) {
            k = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
            t = Mul(x, k)
        },
        else_branch = else_g () => (float[4] e) {
            k = Relu(x)
            k2 = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
            e = Add(k, k2)
        }
    >
}"""
    before = make_model(text)
    after, stats = apply(before, [constants_to_initializers, dedup])
    assert stats.applied["deduplicate_initializers"] == 0
    branches = {a.name: a.g for a in after.graph.node[0].attribute}
    assert [i.name for i in branches["else_branch"].initializer] == ["k2"]
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.arange(4, dtype=np.float32)}
        assert_rewritten(before, after, {"If": 1}, feeds=feeds)
