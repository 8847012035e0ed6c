"""QDQ insertion: placement, weight/bias encodings, targets, exclusions, ORT fusion."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.rules.qdq import (
    QuantizeReport,
    activation_tensors,
    bias_correction_axes,
    quantizable_nodes,
    quantize_qdq,
    quantize_weight,
)
from tests.helpers import histogram, make_model, run

_RNG = np.random.default_rng(0)

_CONV_RELU_CONV = """
<ir_version: 8, opset_import: ["" : {opset}]>
agraph (float[2,8,12,12] x) => (float[2,16,12,12] y) {{
    c1 = Conv <pads = [1,1,1,1], group = 1> (x, w1, b1)
    r1 = Relu (c1)
    y = Conv <pads = [1,1,1,1]> (r1, w2, b2)
}}
"""

_MATMUL_ADD = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[4,10,32] x) => (float[4,10,48] y) {
    m = MatMul (x, w)
    y = Add (m, b)
}
"""

_GEMM = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[6,32] x) => (float[6,24] y) {
    g = Gemm <transB = 1> (x, w, b)
    y = Relu (g)
}
"""

_DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[1,8,10,10] x) => (float[1,16,10,10] y) {
    d = Conv <pads = [1,1,1,1], group = 8> (x, wd)
    y = Conv (d, wp)
}
"""


def _conv_relu_conv(opset: int = 13) -> onnx.ModelProto:
    return make_model(
        _CONV_RELU_CONV.format(opset=opset),
        {
            "w1": _RNG.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32),
            "b1": _RNG.normal(0, 0.1, 16).astype(np.float32),
            "w2": _RNG.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32),
            "b2": _RNG.normal(0, 0.1, 16).astype(np.float32),
        },
    )


def _matmul_add() -> onnx.ModelProto:
    return make_model(
        _MATMUL_ADD,
        {
            "w": _RNG.normal(0, 0.2, (32, 48)).astype(np.float32),
            "b": _RNG.normal(0, 0.1, 48).astype(np.float32),
        },
    )


def _gemm() -> onnx.ModelProto:
    return make_model(
        _GEMM,
        {
            "w": _RNG.normal(0, 0.2, (24, 32)).astype(np.float32),
            "b": _RNG.normal(0, 0.1, 24).astype(np.float32),
        },
    )


def _depthwise() -> onnx.ModelProto:
    return make_model(
        _DEPTHWISE,
        {
            "wd": _RNG.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32),
            "wp": _RNG.normal(0, 0.3, (16, 8, 1, 1)).astype(np.float32),
        },
    )


def _feeds(model: onnx.ModelProto, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return [{value.name: rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def _minmax_ranges(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """Min/max of `names` over `feeds`, from the float model with those tensors as outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    ranges: dict[str, tuple[float, float]] = {}
    for feed in feeds:
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
        for name in names:
            lo, hi = float(values[name].min()), float(values[name].max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(lo, old[0]), max(hi, old[1]))
    return ranges


def _calibrated(
    model: onnx.ModelProto, target: str = "ort-cpu", **kwargs
) -> tuple[onnx.ModelProto, QuantizeReport, dict]:
    weight_only = kwargs.pop("weight_only", None)
    input_means = kwargs.pop("input_means", None)
    names = activation_tensors(model, target, **kwargs)
    ranges = _minmax_ranges(model, names, _feeds(model, 8, seed=1))
    quantized, report = quantize_qdq(
        model, ranges, target=target, weight_only=weight_only, input_means=input_means, **kwargs
    )
    return quantized, report, ranges


def _relative_error(model: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    errors = []
    for feed in _feeds(model, 4, seed=2):  # held out from the calibration feeds
        ref, got = run(model, feed)[0], run(quantized, feed)[0]
        errors.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return max(errors)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _dq_attr_axis(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _assert_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert [v.name for v in after.graph.input] == [v.name for v in before.graph.input]
    assert [v.name for v in after.graph.output] == [v.name for v in before.graph.output]
    onnx.checker.check_model(after, full_check=True)


def _ort_optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter[str]:
    """Op histogram of the graph ORT CPU runs after its (extended) graph optimizations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return histogram(onnx.load(options.optimized_model_filepath))


# --- positive cases ----------------------------------------------------------------------------


def test_conv_relu_conv_quantized_and_fused_by_ort(tmp_path: Path) -> None:
    model = _conv_relu_conv()
    assert activation_tensors(model) == ["x", "c1", "r1", "y"]
    quantized, report, ranges = _calibrated(model)
    _assert_interface(model, quantized)
    assert report.quantized == ["Conv_0", "Conv_2"]
    assert report.kept_float == {}
    # x, c1 (output of Conv_0), r1 (input of Conv_2); y is a graph output with no reader
    assert report.quantized_tensors == ["x", "r1", "c1"]
    assert histogram(quantized) == Counter(
        {"QuantizeLinear": 3, "DequantizeLinear": 3 + 4, "Conv": 2, "Relu": 1}
    )
    assert _relative_error(model, quantized) < 0.03

    inits = _initializers(quantized)
    for weight, bias, act in (("w1", "b1", "x"), ("w2", "b2", "r1")):
        assert weight not in inits and bias not in inits  # float copies dropped
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight))
        q, scale = inits[f"{weight}_quantized"], inits[f"{weight}_scale"]
        assert q.dtype == np.int8 and np.abs(q).max() <= 127
        np.testing.assert_allclose(scale, np.abs(w).reshape(16, -1).max(axis=1) / 127, rtol=1e-6)
        assert _dq_attr_axis(_producer(quantized, f"{weight}_dequantized")) == 0
        assert not inits[f"{weight}_zero_point"].any()
        # bias: int32, scale = s_x * s_w per channel, zero point 0
        qb, sb = inits[f"{bias}_quantized"], inits[f"{bias}_scale"]
        assert qb.dtype == np.int32 and inits[f"{bias}_zero_point"].dtype == np.int32
        np.testing.assert_allclose(sb, inits[f"{act}_scale"] * scale, rtol=1e-6)
    # ort-cpu activations: uint8 asymmetric from the range
    lo, hi = ranges["x"]
    assert inits["x_zero_point"].dtype == np.uint8
    np.testing.assert_allclose(inits["x_scale"], (hi - lo) / 255, rtol=1e-6)
    assert inits["x_zero_point"] == np.clip(np.rint(-lo / inits["x_scale"]), 0, 255)

    ops = _ort_optimized_ops(quantized, tmp_path)
    assert ops["QLinearConv"] >= 1, dict(ops)


def test_matmul_add_per_column_weights(tmp_path: Path) -> None:
    model = _matmul_add()
    # static input shape and a bias Add: ORT would fuse MatMul + Add into a float Gemm, so the
    # output gets Q/DQ too and the layer is a QLinearMatMul (qdq case 5b, targets 1)
    assert activation_tensors(model) == ["x", "m"]
    assert activation_tensors(model, "tensorrt") == ["x"]
    quantized, report, ranges = _calibrated(model)
    _assert_interface(model, quantized)
    assert report.quantized == ["MatMul_0"]
    inits = _initializers(quantized)
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(inits["w_scale"], np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert _dq_attr_axis(_producer(quantized, "w_dequantized")) == 1
    assert _node(quantized, "Add_1").input[0] == "m_dequantized"
    assert inits["b"].dtype == np.float32
    assert _relative_error(model, quantized) < 0.03
    assert histogram(quantized)["QuantizeLinear"] == 2
    assert _ort_optimized_ops(quantized, tmp_path)["QLinearMatMul"] == 1
    # with a dynamic batch ORT keeps the MatMul: no output Q, computed as MatMulIntegerToFloat
    dynamic = make_model(
        _MATMUL_ADD.replace("float[4,10,32] x", "float[N,10,32] x").replace(
            "float[4,10,48] y", "float[N,10,48] y"
        ),
        {t.name: numpy_helper.to_array(t) for t in model.graph.initializer},
    )
    assert activation_tensors(dynamic) == ["x"]
    quantized, _ = quantize_qdq(dynamic, ranges)
    assert _node(quantized, "Add_1").input[0] == "m"
    ops = _ort_optimized_ops(quantized, tmp_path)
    assert ops["MatMulIntegerToFloat"] == 1 and ops["QLinearMatMul"] == 0, dict(ops)


def test_gemm_transb_axis_and_int32_bias(tmp_path: Path) -> None:
    model = _gemm()
    quantized, report, _ = _calibrated(model)
    _assert_interface(model, quantized)
    assert report.quantized == ["Gemm_0"]
    inits = _initializers(quantized)
    w = numpy_helper.to_array(model.graph.initializer[0])  # [N, K] with transB = 1
    np.testing.assert_allclose(inits["w_scale"], np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert _dq_attr_axis(_producer(quantized, "w_dequantized")) == 0
    assert inits["b_quantized"].dtype == np.int32
    assert _relative_error(model, quantized) < 0.03
    assert _ort_optimized_ops(quantized, tmp_path)["QGemm"] == 1  # com.microsoft, ORT's own


def test_gemm_without_transb_uses_axis_1() -> None:
    text = _GEMM.replace("<transB = 1> ", "")
    model = make_model(
        text,
        {
            "w": _RNG.normal(0, 0.2, (32, 24)).astype(np.float32),
            "b": _RNG.normal(0, 0.1, 24).astype(np.float32),
        },
    )
    quantized, _, _ = _calibrated(model)
    assert _dq_attr_axis(_producer(quantized, "w_dequantized")) == 1
    assert _relative_error(model, quantized) < 0.03


def test_tensorrt_symmetric_int8_inputs_only() -> None:
    model = _conv_relu_conv()
    assert activation_tensors(model, "tensorrt") == ["x", "r1"]
    quantized, report, ranges = _calibrated(model, "tensorrt")
    _assert_interface(model, quantized)
    inits = _initializers(quantized)
    for tensor in ("x", "r1"):
        assert inits[f"{tensor}_zero_point"].dtype == np.int8
        assert inits[f"{tensor}_zero_point"] == 0
        lo, hi = ranges[tensor]
        np.testing.assert_allclose(inits[f"{tensor}_scale"], max(-lo, hi) / 127, rtol=1e-6)
    assert report.quantized_tensors == ["x", "r1"]
    assert histogram(quantized)["QuantizeLinear"] == 2
    assert _relative_error(model, quantized) < 0.03


def test_opset_12_converted_to_13() -> None:
    model = _conv_relu_conv(opset=12)
    quantized, report, _ = _calibrated(model)
    _assert_interface(model, quantized)
    assert (report.opset_before, report.opset_after) == (12, 13)
    assert report.opset_changed and any("opset 12 to 13" in n for n in report.notes)
    assert report.quantized == ["Conv_0", "Conv_2"]
    assert _relative_error(model, quantized) < 0.03


def test_shared_activation_one_pair_float_reader_keeps_float() -> None:
    # x feeds a quantized MatMul and a float Sigmoid: one Q/DQ pair, Sigmoid reads float x
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[4,32] x) => (float[4,48] y, float[4,48] z, float[4,32] s) {
        y = MatMul (x, w)
        z = MatMul (x, w2)
        s = Sigmoid (x)
    }
    """
    model = make_model(
        text,
        {
            "w": _RNG.normal(size=(32, 48)).astype(np.float32),
            "w2": _RNG.normal(size=(32, 48)).astype(np.float32),
        },
    )
    quantized, report, _ = _calibrated(model)
    _assert_interface(model, quantized)
    assert histogram(quantized)["QuantizeLinear"] == 1  # outputs y, z are graph outputs
    assert _node(quantized, "MatMul_0").input[0] == "x_dequantized"
    assert _node(quantized, "MatMul_1").input[0] == "x_dequantized"
    assert _node(quantized, "Sigmoid_2").input[0] == "x"


# --- negative cases ----------------------------------------------------------------------------


def test_depthwise_conv_stays_float() -> None:
    model = _depthwise()
    cands = {c.name: c for c in quantizable_nodes(model)}
    assert "depthwise" in str(cands["Conv_0"].reason)
    assert cands["Conv_1"].quantizable
    quantized, report, _ = _calibrated(model)
    _assert_interface(model, quantized)
    assert report.quantized == ["Conv_1"]
    assert "depthwise" in report.kept_float["Conv_0"]
    assert _node(quantized, "Conv_0").input[1] == "wd"  # float weight kept (case 6: no Conv)
    assert _relative_error(model, quantized) < 0.03


def test_exclude_regex_keeps_node_float() -> None:
    model = _conv_relu_conv()
    quantized, report, _ = _calibrated(model, exclude=[r"_2$"])
    _assert_interface(model, quantized)
    assert report.quantized == ["Conv_0"]
    assert "excluded" in report.kept_float["Conv_2"]
    assert _node(quantized, "Conv_2").input[1] == "w2"
    # op types match exactly: "Conv" excludes both Convs, "ConvTranspose" neither
    _, by_op = quantize_qdq(model, {}, exclude=["Conv"])
    assert by_op.quantized == [] and len(by_op.kept_float) == 2
    assert all(c.quantizable for c in quantizable_nodes(model, exclude=["ConvTranspose"]))


def test_nodes_restricts_selection_and_rejects_unknown_names() -> None:
    model = _conv_relu_conv()
    quantized, report, _ = _calibrated(model, nodes={"Conv_2"})
    assert report.quantized == ["Conv_2"]
    assert report.kept_float["Conv_0"] == "not in the selected nodes"
    with pytest.raises(UsageError, match="nodes not in the model"):
        quantize_qdq(model, {}, nodes={"nope"})


def test_matmul_with_activation_b_and_tiny_weight_stay_float() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[4,8] a, float[8,4] b) => (float[4,4] y, float[4,4] t) {
        y = MatMul (a, b)
        t = MatMul (a, small)
    }
    """
    model = make_model(text, {"small": _RNG.normal(size=(8, 4)).astype(np.float32)})
    reasons = {c.name: c.reason for c in quantizable_nodes(model)}
    assert reasons["MatMul_0"] == "B is not a constant initializer"
    assert "too small (32 < 64" in str(reasons["MatMul_1"])
    quantized, report = quantize_qdq(model, {"a": (-1.0, 1.0)})
    assert report.quantized == [] and histogram(quantized) == histogram(model)
    assert activation_tensors(model) == []


def test_subgraph_nodes_stay_float() -> None:
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["t"], name="inner")],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [4, 16])],
    )
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["e"], name="inner2")],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [4, 16])],
    )
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                "If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch
            )
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 16]),
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(_RNG.normal(size=(16, 16)).astype(np.float32), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    quantized, report = quantize_qdq(model, {"x": (-1.0, 1.0), "t": (-1.0, 1.0)})
    assert report.quantized == []
    assert report.kept_float["inner"].startswith("inside a subgraph")
    assert report.opset_after == 13
    onnx.checker.check_model(quantized, full_check=True)


def test_missing_range_keeps_node_float() -> None:
    model = _conv_relu_conv()
    names = activation_tensors(model)
    ranges = _minmax_ranges(model, names, _feeds(model, 2, seed=1))
    del ranges["r1"]
    quantized, report = quantize_qdq(model, ranges)
    assert report.quantized == ["Conv_0"]
    assert "no calibrated range" in report.kept_float["Conv_2"]
    onnx.checker.check_model(quantized, full_check=True)
    assert _relative_error(model, quantized) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "gpu"}, "--target .gpu.: expected one of"),
        ({"exclude": ["("]}, "not a valid regex"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        quantize_qdq(_gemm(), {}, **kwargs)


def test_bad_range_rejected() -> None:
    with pytest.raises(UsageError, match="lo <= hi"):
        quantize_qdq(_gemm(), {"x": (1.0, -1.0)})


def test_quantize_weight_zero_channel() -> None:
    w = np.zeros((3, 4), dtype=np.float32)
    w[1] = [1.0, -2.54, 0.0, 0.5]
    q, scale = quantize_weight(w, 0)
    assert q.dtype == np.int8
    np.testing.assert_allclose(scale, [1.0, 2.54 / 127, 1.0], rtol=1e-6)
    assert q[1, 1] == -127 and not q[0].any() and not q[2].any()


def test_conv_transpose_per_channel_axis_1() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[1,8,6,6] x) => (float[1,4,12,12] y) {
        t = ConvTranspose <strides = [2,2], pads = [0,0,0,0], output_shape = [12,12]> (x, w, b)
        y = Relu (t)
    }
    """
    model = make_model(
        text,
        {
            "w": _RNG.normal(0, 0.2, (8, 4, 2, 2)).astype(np.float32),
            "b": _RNG.normal(0, 0.1, 4).astype(np.float32),
        },
    )
    quantized, report, _ = _calibrated(model)
    _assert_interface(model, quantized)
    assert report.quantized == ["ConvTranspose_0"]
    inits = _initializers(quantized)
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(
        inits["w_scale"], np.abs(w).transpose(1, 0, 2, 3).reshape(4, -1).max(axis=1) / 127
    )
    assert _dq_attr_axis(_producer(quantized, "w_dequantized")) == 1
    assert inits["b_quantized"].dtype == np.int32
    assert _relative_error(model, quantized) < 0.03


def test_op_type_pattern_matches_exactly() -> None:
    model = _conv_relu_conv()
    for node in model.graph.node:
        node.name = f"layer{len(node.name)}_{node.output[0]}"
    cands = quantizable_nodes(model, exclude=["Con"])
    assert all(c.quantizable for c in cands)  # "Con" is not an op type nor in a name
    assert not any(c.quantizable for c in quantizable_nodes(model, exclude=["Conv"]))


_TWO_MATMULS = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[4,32] x) => (float[4,16] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""


def _two_matmuls() -> onnx.ModelProto:
    return make_model(
        _TWO_MATMULS,
        {
            "w1": _RNG.normal(0, 0.3, (32, 64)).astype(np.float32),
            "w2": _RNG.normal(0, 0.3, (64, 16)).astype(np.float32),
        },
    )


def test_weight_only_storage_for_matmul_kept_float() -> None:
    model = _two_matmuls()
    quantized, report, _ = _calibrated(model, nodes={"MatMul_0"})
    assert report.quantized == ["MatMul_0"] and report.weight_only == ["MatMul_2"]
    assert report.kept_float["MatMul_2"] == "not in the selected nodes"
    node = _node(quantized, "MatMul_2")
    dq = _producer(quantized, node.input[1])
    assert dq.op_type == "DequantizeLinear" and _dq_attr_axis(dq) == 1
    assert _initializers(quantized)[dq.input[0]].dtype == np.int8
    # the activation stays float: the node reads Relu's output directly, no DQ in between
    assert _producer(quantized, node.input[0]).op_type == "Relu"
    assert "w2" not in _initializers(quantized)  # the float copy is gone
    _assert_interface(model, quantized)
    assert _relative_error(model, quantized) < 0.03
    # off, or excluded by the user: the weight stays float
    plain, plain_report, _ = _calibrated(model, nodes={"MatMul_0"}, weight_only=False)
    assert plain_report.weight_only == [] and _node(plain, "MatMul_2").input[1] == "w2"
    excluded, excluded_report, _ = _calibrated(model, exclude=["MatMul_2"])
    assert excluded_report.weight_only == [] and _node(excluded, "MatMul_2").input[1] == "w2"
    # tensorrt expects Q/DQ on activations too: no weight-only storage by default
    _, trt_report, _ = _calibrated(model, target="tensorrt", nodes={"MatMul_0"})
    assert trt_report.weight_only == []


def test_weight_only_conv_needs_a_share_of_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import onnxshrink.quant.targets as targets_module

    model = _conv_relu_conv()
    _, report, _ = _calibrated(model, nodes={"Conv_0"})
    assert report.weight_only == ["Conv_2"]  # its weight is most of the model's
    # a Conv below the share keeps a float weight (and ORT's NCHWc kernels)
    strict = dataclasses.replace(targets_module.PROFILES["ort-cpu"], conv_weight_only_share=0.99)
    monkeypatch.setitem(targets_module.PROFILES, "ort-cpu", strict)
    plain, report, _ = _calibrated(model, nodes={"Conv_0"})
    assert report.weight_only == [] and _node(plain, "Conv_2").input[1] == "w2"


_POINTWISE = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,8,6,6] x, float[3,16] v) => (float[2,8,6,6] y, float[3,8] z) {
    y = Conv (x, w, b)
    z = Gemm <transB = 1, alpha = 2.0, beta = 0.5> (v, g, c)
}
"""


def _rounding_down(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Weights that int8 rounding moves down by 0.4 steps everywhere but each row's maximum."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(-100, 100, size=shape).astype(np.float64) + 0.4
    rows = steps.reshape(shape[0], -1)
    rows[:, 0] = 127.0  # the max sets the scale to exactly 1/1000 per row
    return (rows.reshape(shape) / 1000.0).astype(np.float32)


def test_bias_correction_cancels_the_mean_shift_of_rounded_weights() -> None:
    model = make_model(
        _POINTWISE,
        {
            "w": _rounding_down((8, 8, 1, 1), 0),
            "b": np.zeros(8, np.float32),
            "g": _rounding_down((8, 16), 1),
            "c": np.ones(8, np.float32),
        },
    )
    rng = np.random.default_rng(2)
    feed = {
        "x": (5.0 + rng.normal(size=(2, 8, 6, 6))).astype(np.float32),
        "v": (3.0 + rng.normal(size=(3, 16))).astype(np.float32),
    }
    means = {
        "x": feed["x"].astype(np.float64).mean(axis=(0, 2, 3)),
        "v": feed["v"].astype(np.float64).mean(axis=0),
    }
    assert bias_correction_axes(model) == {"x": 1, "v": -1}
    ref = run(model, feed)

    def mean_shift(**kwargs) -> tuple[float, float, QuantizeReport]:
        q, report = quantize_qdq(model, {}, nodes=set(), **kwargs)  # weight-only, no ranges
        out = run(q, feed)
        # per-channel mean over everything else: with mu taken from this very feed, the
        # correction cancels it exactly (up to float32 rounding)
        conv = float(np.abs((out[0] - ref[0]).mean(axis=(0, 2, 3))).max())
        gemm = float(np.abs((out[1] - ref[1]).mean(axis=0)).max())
        return conv, gemm, report

    conv_raw, gemm_raw, report = mean_shift()
    assert report.weight_only == ["Conv_0", "Gemm_1"] and report.bias_corrected == []
    conv_fixed, gemm_fixed, report = mean_shift(input_means=means)
    assert report.bias_corrected == ["Conv_0", "Gemm_1"]
    assert conv_raw > 5e-3 and gemm_raw > 5e-3  # the systematic shift is there
    assert conv_fixed < 0.05 * conv_raw and gemm_fixed < 0.05 * gemm_raw


def test_bias_correction_with_activation_quantization_and_no_bias() -> None:
    model = _conv_relu_conv()
    rng = np.random.default_rng(3)
    means = {
        "x": rng.normal(size=8),
        "r1": np.abs(rng.normal(size=16)),
    }
    quantized, report, _ = _calibrated(model, input_means=means)
    assert report.bias_corrected == ["Conv_0", "Conv_2"]
    onnx.checker.check_model(quantized, full_check=True)
    # the corrected biases are int32 at scale s_x * s_w, as in case 3
    conv = _node(quantized, "Conv_2")
    bias_dq = _producer(quantized, conv.input[2])
    assert _initializers(quantized)[bias_dq.input[0]].dtype == np.int32
    # a Conv without a bias gets one; a grouped Conv is left alone
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[1,8,6,6] x) => (float[1,8,6,6] y) {
        h = Conv (x, w)
        y = Conv <group = 2> (h, wg)
    }
    """
    plain = make_model(
        text,
        {
            "w": _RNG.normal(size=(8, 8, 1, 1)).astype(np.float32),
            "wg": _RNG.normal(size=(8, 4, 1, 1)).astype(np.float32),
        },
    )
    assert bias_correction_axes(plain) == {"x": 1}
    q, report = quantize_qdq(plain, {}, nodes=set(), input_means={"x": np.ones(8)})
    assert report.bias_corrected == ["Conv_0"] and len(_node(q, "Conv_0").input) == 3
    assert len(_node(q, "Conv_1").input) == 2


_RESIDUAL = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[1,8,8,8] x) => (float[1,8,4,4] y) {
    c1 = Conv <pads = [1,1,1,1]> (x, w1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1,1,1,1]> (r1, w2)
    s = Add (c2, r1)
    p = MaxPool <kernel_shape = [2,2], strides = [2,2]> (s)
    y = Conv <pads = [1,1,1,1]> (p, w3)
}
"""


def test_tensorrt_quantizes_residual_add_and_pooling_inputs() -> None:
    model = make_model(
        _RESIDUAL,
        {name: _RNG.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32) for name in ("w1", "w2", "w3")},
    )
    names = activation_tensors(model, "tensorrt")
    assert names == ["x", "r1", "p", "s"]  # conv inputs, then the pooling input
    quantized, report, _ = _calibrated(model, target="tensorrt")
    assert sorted(report.tensorrt_joins) == ["Add_3", "MaxPool_4"]
    add, pool = _node(quantized, "Add_3"), _node(quantized, "MaxPool_4")
    assert add.input[0] == "c2"  # the quantized layer's own output stays as it is
    assert _producer(quantized, add.input[1]).op_type == "DequantizeLinear"  # the residual
    assert _producer(quantized, pool.input[0]).op_type == "DequantizeLinear"
    onnx.checker.check_model(quantized, full_check=True)
    _assert_interface(model, quantized)
    assert _relative_error(model, quantized) < 0.05
    # ort-cpu has its own layout (case 5b): no joins there
    _, cpu_report, _ = _calibrated(model)
    assert cpu_report.tensorrt_joins == []
    # nothing quantized next to them: no Q/DQ for the Add or the pooling either
    _, none_report, _ = _calibrated(model, target="tensorrt", nodes={"Conv_0"})
    assert none_report.tensorrt_joins == []


def test_near_zero_weight_channel_gets_a_scale_that_fits_the_int32_bias(tmp_path: Path) -> None:
    model = _conv_relu_conv()
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1")).copy()
    w1[3] = 1e-12  # a dead channel (e.g. pruned, or a BatchNorm gamma of ~0 folded in)
    b1 = np.full(16, 0.05, np.float32)
    b1[3] = 5.0  # ... whose bias still matters: it is the channel's whole output
    for name, value in (("w1", w1), ("b1", b1)):
        init = next(t for t in model.graph.initializer if t.name == name)
        init.CopyFrom(numpy_helper.from_array(value, name))
    quantized, report, _ = _calibrated(model)
    assert any("Conv_0: weight scale raised on 1 channel" in n for n in report.notes)
    assert not any("overflows" in n for n in report.notes)
    bias = _producer(quantized, _node(quantized, "Conv_0").input[2])
    assert bias.op_type == "DequantizeLinear"  # the bias is int32, so ORT can fuse the node
    assert _initializers(quantized)[bias.input[0]].dtype == np.int32
    optimized = _ort_optimized_ops(quantized, tmp_path)
    assert optimized["QLinearConv"] >= 1 and optimized["Conv"] <= 1  # Conv_0 fused
    assert _relative_error(model, quantized) < 0.03


def test_ort_cuda_stores_every_weight_int8_and_computes_in_float() -> None:
    model = _depthwise()
    assert activation_tensors(model, "ort-cuda") == []  # no activation is quantized (case 8)
    quantized, report = quantize_qdq(model, {}, target="ort-cuda")
    assert report.quantized == [] and report.weight_only == ["Conv_0", "Conv_1"]  # depthwise too
    assert all("ort-cuda" in reason for reason in report.kept_float.values())
    hist = histogram(quantized)
    assert hist["QuantizeLinear"] == 0 and hist["DequantizeLinear"] == 2
    assert _node(quantized, "Conv_0").input[0] == "x"
    onnx.checker.check_model(quantized, full_check=True)
    _assert_interface(model, quantized)
    assert _relative_error(model, quantized) < 0.01
