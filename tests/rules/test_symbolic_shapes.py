"""Tests for rules/symbolic_shapes.py: equal dynamic dims get one name, contrib ops get shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.engine.passes import PassStats, RuleContext
from onnxshrink.engine.shapes import infer_shapes
from onnxshrink.rules import lossless_passes, symbolic_shapes
from tests.helpers import apply, assert_rewritten, make_model

WITHOUT = [p for p in lossless_passes() if p.name != "symbolic-shapes"]


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _tail_model(declared_output: str) -> onnx.ModelProto:
    # A CRNN head: flatten time steps for a MatMul, then restore [T, 2, C] from Shape(a).
    # onnx loses T at the first Reshape ([3T, 4]); the pass keeps 3T and divides it back.
    text = f"""<ir_version: 10, opset_import: ["" : 14]>
g (float[N, 2, 6] x) => ({declared_output} y) {{
    a = Relu(x)
    f = Reshape(a, quarter)
    g = Reshape(f, flat)
    m = MatMul(g, w)
    s = Shape(a)
    d = Gather<axis = 0>(s, zero)
    u = Unsqueeze(d, axes)
    t = Concat<axis = 0>(u, rest)
    y = Reshape(m, t)
}}"""
    w = np.random.default_rng(0).normal(size=(12, 10)).astype(np.float32)
    inits = dict(
        quarter=_i64(-1, 4),
        flat=_i64(-1, 12),
        w=w,
        zero=np.array(0, np.int64),
        axes=_i64(0),
        rest=_i64(2, -1),
    )
    return make_model(text, inits)


def _feeds(n: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(size=(n, 2, 6)).astype(np.float32)}


def test_reshape_minus_one_keeps_the_symbol_and_the_shape_chain_folds():
    before = _tail_model("float[N, 2, 5]")
    after, _ = apply(before, lossless_passes())
    # (3N * 4) / 12 = N, the dim Shape(a)[0] reads: the last target becomes [0, 2, -1].
    ops = {"Relu": 1, "Reshape": 2, "MatMul": 1}
    assert_rewritten(before, after, ops, feeds=_feeds())
    assert_rewritten(before, after, ops, feeds=_feeds(7))
    last = next(i for i in after.graph.initializer if i.name == after.graph.node[-1].input[1])
    assert onnx.numpy_helper.to_array(last).tolist() == [0, 2, -1]


def test_without_the_pass_the_shape_chain_stays():
    before = _tail_model("float[N, 2, 5]")
    after, _ = apply(before, WITHOUT)
    ops = {"Relu": 1, "Reshape": 2, "MatMul": 1, "Shape": 1, "Gather": 1, "Unsqueeze": 1}
    assert_rewritten(before, after, {**ops, "Concat": 1}, feeds=_feeds())


def test_a_wrong_declared_output_shape_is_not_evidence():
    # The declared output says [1, N, 5]; the model computes [N, 2, 5]. Trusting the declaration
    # would make the last Reshape produce [1, 10N].
    before = _tail_model("float[1, N, 5]")
    after, _ = apply(before, lossless_passes())
    assert after.graph.output[0].type == before.graph.output[0].type
    feeds = _feeds(4)
    assert_rewritten(before, after, {"Relu": 1, "Reshape": 2, "MatMul": 1}, feeds=feeds)
    from tests.helpers import run

    assert run(after, feeds)[0].shape == (4, 2, 5)


def test_inexact_division_gets_a_fresh_dim_and_nothing_folds():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[N, 2, 6] x) => (float[?, 5] y) {
    a = Relu(x)
    f = Reshape(a, flat)
    m = MatMul(f, w)
    s = Shape(a)
    d = Gather<axis = 0>(s, zero)
    u = Unsqueeze(d, axes)
    t = Concat<axis = 0>(u, five)
    y = Reshape(m, t)
}"""
    w = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    before = make_model(
        text, dict(flat=_i64(-1, 4), w=w, zero=np.array(0, np.int64), axes=_i64(0), five=_i64(-1))
    )
    after, _ = apply(before, lossless_passes())
    # [3N, 5] reshaped to [N, -1]: the first entry is not the input's dim 0 (3N), so it stays.
    ops = {"Relu": 1, "Reshape": 2, "MatMul": 1, "Shape": 1, "Gather": 1, "Unsqueeze": 1}
    assert_rewritten(before, after, {**ops, "Concat": 1}, feeds=_feeds())


def _contrib_lstm_graph() -> gs.Graph:
    text = """<ir_version: 10, opset_import: ["" : 14, "com.microsoft" : 1]>
g (float[T, 1, 8] x) => (float[T, 1, 16] y) {
    h = com.microsoft.DynamicQuantizeLSTM<direction = "bidirectional", hidden_size = 8>(x)
    y = Reshape(h, target)
}"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(_i64(0, 0, -1), "target"))
    return gs.import_onnx(infer_shapes(model))


def _refine(graph: gs.Graph) -> bool:
    return symbolic_shapes.refine_shapes(graph, RuleContext(graph, graph, 14, PassStats()))


def test_contrib_lstm_output_gets_the_lstm_shape():
    graph = _contrib_lstm_graph()
    h = graph.tensors()["h"]
    assert h.shape is None  # onnx has no schema for the contrib op
    assert _refine(graph) is False  # an analysis: no node changed
    assert h.shape == ["T", 2, 1, 8]


def test_graph_inputs_and_outputs_keep_their_declared_shapes():
    graph = _contrib_lstm_graph()
    _refine(graph)
    assert graph.inputs[0].shape == ["T", 1, 8]
    assert graph.outputs[0].shape == ["T", 1, 16]


def test_unmodelled_custom_op_is_left_unknown():
    text = """<ir_version: 10, opset_import: ["" : 14, "custom" : 1]>
g (float[T, 1, 8] x) => (float[T, 1, 8] y) {
    h = custom.Mystery(x)
    y = Relu(h)
}"""
    graph = gs.import_onnx(infer_shapes(onnx.parser.parse_model(text)))
    _refine(graph)
    assert graph.tensors()["h"].shape is None
