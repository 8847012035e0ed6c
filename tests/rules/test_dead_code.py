"""Tests for rules/dead_code.py: Constant nodes -> initializers, dead nodes and outputs removed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.engine.passes import PassStats, RuleContext
from onnxshrink.rules.dead_code import constants_to_initializers, remove_dead_code
from tests.helpers import apply, assert_rewritten, histogram, make_model, run


def _ctx(graph: gs.Graph, opset: int = 14) -> RuleContext:
    return RuleContext(graph, graph, opset, PassStats())


def _initializers(model: onnx.ModelProto) -> list[str]:
    names: list[str] = []

    def walk(graph: onnx.GraphProto) -> None:
        names.extend(i.name for i in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    return names


# --- constants_to_initializers ------------------------------------------------------------


def test_every_kind_of_constant_becomes_an_initializer():
    text = """
    <ir_version: 10, opset_import: ["" : 14]>
    g (float[2,3] x) => (float[2,3] y, int64[2] s) {
        a = Constant<value = float[3] {1.0, 2.0, 3.0}>()
        b = Constant<value_float = 2.0>()
        c = Constant<value_floats = [0.5, 0.25, 0.125]>()
        d = Constant<value_int = 1>()
        e = Constant<value_ints = [3, 2]>()
        t0 = Add(x, a)
        t1 = Mul(t0, b)
        y = Sub(t1, c)
        s0 = Shape(x)
        s1 = Add(s0, d)
        s = Sub(s1, e)
    }
    """
    model = make_model(text)
    after, stats = apply(model, constants_to_initializers)
    assert stats.applied["constants_to_initializers"] == 1
    assert_rewritten(model, after, {"Add": 2, "Mul": 1, "Sub": 2, "Shape": 1})
    assert len(after.graph.initializer) == 5
    d = next(i for i in after.graph.initializer if i.name == "d")
    assert d.data_type == onnx.TensorProto.INT64 and list(d.dims) == []


def test_constant_that_is_a_graph_output_keeps_its_node():
    text = """
    <ir_version: 10, opset_import: ["" : 14]>
    g (float[3] x) => (float[3] y, float[3] k) {
        k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
        y = Add(x, k)
    }
    """
    model = make_model(text)
    after, _ = apply(model, constants_to_initializers)
    assert_rewritten(model, after, {"Constant": 1, "Add": 1})


def test_nothing_to_convert_reports_no_change():
    model = make_model("""
    <ir_version: 10, opset_import: ["" : 14]>
    g (float[3] x) => (float[3] y) { y = Relu(x) }
    """)
    graph = gs.import_onnx(model)
    assert constants_to_initializers(graph, _ctx(graph)) is False


def test_constant_inside_if_branch_becomes_a_branch_initializer():
    text = """
    <ir_version: 10, opset_import: ["" : 14]>
    g (bool cond, float[3] x) => (float[3] y) {
        y = If(cond) <
            then_branch = then_g () => (float[3] t) {
                k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
                t = Mul(x, k)
            },
            else_branch = else_g () => (float[3] e) { e = Relu(x) }
        >
    }
    """
    model = make_model(text)
    after, _ = apply(model, constants_to_initializers)
    assert histogram(after, recurse=True) == {"If": 1, "Mul": 1, "Relu": 1}
    assert _initializers(after) == ["k"]
    feeds = {"cond": np.array(True), "x": np.array([1.0, -2.0, 3.0], np.float32)}
    assert_rewritten(model, after, {"If": 1}, feeds=feeds)


def _shared_constant_model(size: int) -> onnx.ModelProto:
    values = ", ".join("1.5" for _ in range(size))
    text = f"""
    <ir_version: 10, opset_import: ["" : 14]>
    g (bool cond, float[{size}] x) => (float[{size}] y) {{
        k = Constant<value = float[{size}] {{{values}}}>()
        y = If(cond) <
            then_branch = then_g () => (float[{size}] t) {{ t = Mul(x, k) }},
            else_branch = else_g () => (float[{size}] e) {{ e = Add(x, k) }}
        >
    }}
    """
    return make_model(text)


def test_large_constant_read_by_two_branches_keeps_its_node():
    # As an initializer it would be stored once per branch (case 3).
    model = _shared_constant_model(128)
    after, _ = apply(model, constants_to_initializers)
    assert histogram(after, recurse=True) == {"Constant": 1, "If": 1, "Mul": 1, "Add": 1}
    assert _initializers(after) == []


def test_small_constant_read_by_two_branches_is_converted():
    model = _shared_constant_model(4)
    after, _ = apply(model, constants_to_initializers)
    assert histogram(after, recurse=True) == {"If": 1, "Mul": 1, "Add": 1}
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.arange(4, dtype=np.float32)}
        np.testing.assert_array_equal(run(after, feeds)[0], run(model, feeds)[0])


def test_string_constant_is_left_alone():
    text = """
    <ir_version: 10, opset_import: ["" : 14]>
    g (float[3] x) => (float[3] y) {
        s = Constant<value_strings = ["a", "b"]>()
        n = Size(s)
        f = Cast<to = 1>(n)
        y = Add(x, f)
    }
    """
    model = make_model(text)
    after, _ = apply(model, constants_to_initializers)
    assert histogram(after)["Constant"] == 1


# --- remove_dead_code ---------------------------------------------------------------------

DEAD_CHAIN = """
<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x, float[2,3] unused) => (float[2,3] y) {
    y = Relu(x)
    d0 = Sigmoid(x)
    d1 = Mul(d0, w)
}
"""


def test_dead_chain_and_its_initializer_are_removed_and_reported_once():
    model = make_model(DEAD_CHAIN, {"w": np.ones((2, 3), np.float32)})
    graph = gs.import_onnx(model)
    assert remove_dead_code(graph, _ctx(graph)) is True
    assert [n.op for n in graph.nodes] == ["Relu"]
    assert remove_dead_code(graph, _ctx(graph)) is False
    # Unused graph inputs are part of the interface: kept.
    assert [t.name for t in graph.inputs] == ["x", "unused"]
    after, _ = apply(model, remove_dead_code)
    assert_rewritten(model, after, {"Relu": 1})
    assert len(after.graph.initializer) == 0


def test_clean_graph_reports_no_change():
    model = make_model("""
    <ir_version: 10, opset_import: ["" : 14]>
    g (float[2] x) => (float[2] y) { y = Relu(x) }
    """)
    graph = gs.import_onnx(model)
    assert remove_dead_code(graph, _ctx(graph)) is False


def test_unused_optional_outputs_are_trimmed():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,2,4,4] x) => (float[1,2,2,2] y, float[1,2,4,4] z) {
        y, idx = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(x)
        z, mask = Dropout(x)
    }
    """
    model = make_model(text)
    graph = gs.import_onnx(model)
    assert remove_dead_code(graph, _ctx(graph, 13)) is True
    assert all(len(n.outputs) == 1 for n in graph.nodes)
    after, _ = apply(model, remove_dead_code)
    assert_rewritten(model, after, {"MaxPool": 1, "Dropout": 1})
    assert all(len(n.output) == 1 for n in after.graph.node)


def test_inner_unused_optional_output_becomes_empty_name():
    # LSTM outputs Y, Y_h, Y_c are all optional: an unused Y in front of a used Y_h is blanked.
    hidden, inputs = 3, 2
    text = f"""
    <ir_version: 10, opset_import: ["" : 14]>
    g (float[5,1,{inputs}] x) => (float[1,1,{hidden}] h) {{
        y, h = LSTM<hidden_size = {hidden}>(x, w, r)
    }}
    """
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.normal(0, 0.5, (1, 4 * hidden, inputs)).astype(np.float32),
        "r": rng.normal(0, 0.5, (1, 4 * hidden, hidden)).astype(np.float32),
    }
    model = make_model(text, weights)
    after, _ = apply(model, remove_dead_code)
    assert list(after.graph.node[0].output) == ["", "h"]
    assert_rewritten(model, after, {"LSTM": 1})


def test_unused_split_outputs_are_kept():
    # Split's outputs are not optional: their count decides the split.
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[4,2] x) => (float[2,2] y) {
        y, rest = Split<axis = 0>(x)
    }
    """
    model = make_model(text)
    graph = gs.import_onnx(model)
    assert remove_dead_code(graph, _ctx(graph, 13)) is False
    after, _ = apply(model, remove_dead_code)
    assert len(after.graph.node[0].output) == 2
    assert_rewritten(model, after, {"Split": 1})


def test_dead_node_inside_if_branch_is_removed():
    text = """
    <ir_version: 10, opset_import: ["" : 14]>
    g (bool cond, float[3] x) => (float[3] y) {
        y = If(cond) <
            then_branch = then_g () => (float[3] t) {
                dead = Sigmoid(x)
                t = Relu(x)
            },
            else_branch = else_g () => (float[3] e) { e = Neg(x) }
        >
    }
    """
    model = make_model(text)
    graph = gs.import_onnx(model)
    assert remove_dead_code(graph, _ctx(graph)) is True
    after, _ = apply(model, remove_dead_code)
    assert histogram(after, recurse=True) == {"If": 1, "Relu": 1, "Neg": 1}
    feeds = {"cond": np.array(True), "x": np.array([1.0, -2.0, 3.0], np.float32)}
    assert_rewritten(model, after, {"If": 1}, feeds=feeds)
