"""Tests for rules/float16.py: chosen nodes compute in float16, graph inputs and outputs float32.

Parity bound. float16 rounds to 2^-11 (about 4.9e-4) relative; every converted tensor and weight
is rounded once, and the errors of the few layers in series of these nets add up to a few 1e-3
of the output's magnitude. Outputs are compared with `rtol = TOL` and `atol = TOL * max|ref|`
(TOL = 1e-2), a margin of at least 2x over what these nets show. ONNX Runtime CPU computes most
float16 ops in float32 between Casts (module docstring), so this measures the storage rounding.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.rules.float16 import (
    FLOAT16_MAX,
    FLOAT16_TINY,
    convert_float16,
    fp16_candidates,
    to_float16,
)
from tests.helpers import histogram, make_model, random_feeds, run

TOL = 1e-2
RNG = np.random.default_rng(0)


def _weights(*shape: int, scale: float = 0.3) -> np.ndarray:
    return RNG.normal(scale=scale, size=shape).astype(np.float32)


CONV_NET = """<ir_version: 10, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,4] y) {
    c1 = Conv<pads = [1,1,1,1]>(x, w1, b1)
    r1 = Relu(c1)
    c2 = Conv<pads = [1,1,1,1]>(r1, w2, b2)
    h = HardSwish(c2)
    p = MaxPool<kernel_shape = [2,2], strides = [2,2]>(h)
    a = GlobalAveragePool(p)
    f = Flatten(a)
    y = Gemm<transB = 1>(f, wf, bf)
}"""
CONV_OPS = ["Conv", "Relu", "Conv", "HardSwish", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"]


def _conv_net() -> onnx.ModelProto:
    return make_model(
        CONV_NET,
        {
            "w1": _weights(8, 3, 3, 3),
            "b1": _weights(8),
            "w2": _weights(8, 8, 3, 3),
            "b2": _weights(8),
            "wf": _weights(4, 8),
            "bf": _weights(4),
        },
    )


ATTENTION_NET = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,4,8] x) => (float[2,4,8] y) {
    q = MatMul(x, wq)
    k = MatMul(x, wk)
    v = MatMul(x, wv)
    kt = Transpose<perm = [0,2,1]>(k)
    s = MatMul(q, kt)
    ss = Mul(s, scale)
    p = Softmax<axis = -1>(ss)
    o = MatMul(p, v)
    r = Add(o, x)
    y = LayerNormalization<axis = -1>(r, gamma, beta)
}"""


def _attention_net() -> onnx.ModelProto:
    return make_model(
        ATTENTION_NET,
        {
            "wq": _weights(8, 8),
            "wk": _weights(8, 8),
            "wv": _weights(8, 8),
            "scale": np.array(8**-0.5, np.float32),
            "gamma": RNG.uniform(0.5, 1.5, 8).astype(np.float32),
            "beta": _weights(8),
        },
    )


def _check(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    expected_ops: dict[str, int],
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
    """Histogram, checker, interface kept exactly (float32), and parity within TOL."""
    assert histogram(after) == Counter(expected_ops), f"ops after: {dict(histogram(after))}"
    onnx.checker.check_model(after, full_check=True)
    assert list(after.graph.input) == list(before.graph.input)
    assert list(after.graph.output) == list(before.graph.output)
    feeds = feeds if feeds is not None else random_feeds(before)
    for ref, got in zip(run(before, feeds), run(after, feeds), strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL * scale)


def _dtype(model: onnx.ModelProto, initializer: str) -> int:
    return next(i.data_type for i in model.graph.initializer if i.name == initializer)


def _casts(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Cast"]


def _casts_only_at_borders(model: onnx.ModelProto) -> bool:
    inputs = {v.name for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    return all(n.input[0] in inputs or n.output[0] in outputs for n in _casts(model))


# --- positive cases ------------------------------------------------------------------------------


def test_conv_net_all_fp16_has_casts_only_at_the_borders():
    before = _conv_net()
    saved = before.SerializeToString()
    names, declined = fp16_candidates(before)
    # unnamed nodes are named as onnxshrink.rules.qdq._named_copy names them
    assert names == [f"{op}_{i}" for i, op in enumerate(CONV_OPS)]
    assert declined == {}
    after, report = convert_float16(before, names)
    assert before.SerializeToString() == saved  # the input is not modified
    assert report.converted_nodes == names
    assert report.casts_inserted == 2
    assert report.initializers_converted == 6 and report.initializers_copied == 0
    assert all(i.data_type == TensorProto.FLOAT16 for i in after.graph.initializer)
    assert _casts_only_at_borders(after)
    _check(before, after, {**Counter(CONV_OPS), "Cast": 2})


def test_attention_net_all_fp16():
    before = _attention_net()
    names, declined = fp16_candidates(before)
    assert len(names) == 10 and declined == {}
    after, report = convert_float16(before, names)
    # x feeds three MatMuls and the residual Add: one Cast, shared
    assert report.casts_inserted == 2
    assert _casts_only_at_borders(after)
    ops = {"MatMul": 5, "Transpose": 1, "Mul": 1, "Softmax": 1, "Add": 1}
    _check(before, after, {**ops, "LayerNormalization": 1, "Cast": 2})


def test_subset_gets_casts_around_it_only():
    before = _conv_net()
    after, report = convert_float16(before, ["Relu_1", "Conv_2"])
    assert report.converted_nodes == ["Relu_1", "Conv_2"]
    casts = _casts(after)
    assert [(c.input[0], c.output[0]) for c in casts] == [("c1", "c1_fp16"), ("c2_fp16", "c2")]
    order = [n.name for n in after.graph.node]
    assert order.index(casts[0].name) == order.index("Conv_0") + 1
    assert order.index(casts[1].name) == order.index("Conv_2") + 1
    assert {i.name for i in after.graph.initializer if i.data_type == TensorProto.FLOAT16} == {
        "w2",
        "b2",
    }
    _check(before, after, {**Counter(CONV_OPS), "Cast": 2})


def test_float_tensors_in_attributes_are_converted():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,8] x, int64[2] shape, int64[2,8] n) => (float[2,8] y) {
    z = ConstantOfShape<value = float[1] {0.5}>(shape)
    m = Mul(x, k)
    a = Add(m, z)
    c = Cast<to = 1>(n)
    y = Add(a, c)
}"""
    before = make_model(text, constant_nodes={"k": _weights(2, 8)})
    feeds = random_feeds(before)
    feeds["shape"] = np.array([2, 8], np.int64)
    names, declined = fp16_candidates(before)
    assert names == ["ConstantOfShape_1", "Mul_2", "Add_3", "Cast_4", "Add_5"]
    assert declined["Constant_0"].startswith("a constant")
    after, report = convert_float16(before, names)
    nodes = {n.op_type: n for n in after.graph.node}
    assert nodes["Constant"].attribute[0].t.data_type == TensorProto.FLOAT16
    assert nodes["ConstantOfShape"].attribute[0].t.data_type == TensorProto.FLOAT16
    cast_to = [a.i for n in _casts(after) for a in n.attribute if a.name == "to"]
    # x's Cast, the model's Cast (now to float16, from int64 directly), y's Cast
    assert cast_to == [TensorProto.FLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT]
    assert report.initializers_converted == 1 and report.casts_inserted == 2
    ops = {"Constant": 1, "ConstantOfShape": 1, "Mul": 1, "Add": 2}
    _check(before, after, {**ops, "Cast": 3}, feeds)


def test_resize_keeps_scales_float32():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[1,2,4,4] x) => (float[1,2,8,8] y) {
    r = Resize<mode = "linear">(x, roi, scales)
    y = Relu(r)
}"""
    before = make_model(
        text,
        {"roi": np.array([], np.float32), "scales": np.array([1, 1, 2, 2], np.float32)},
    )
    names, _ = fp16_candidates(before)
    after, report = convert_float16(before, names)
    assert report.converted_nodes == ["Resize_0", "Relu_1"]
    assert _dtype(after, "scales") == TensorProto.FLOAT
    assert _dtype(after, "roi") == TensorProto.FLOAT
    assert report.initializers_converted == 0
    _check(before, after, {"Resize": 1, "Relu": 1, "Cast": 2})


def test_large_values_are_clipped_and_tiny_ones_kept_nonzero():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[4] x) => (float[4] y) {
    a = Min(x, hi)
    b = Max(a, lo)
    y = Add(b, eps)
}"""
    hi = np.array([1e6, 70000.0, 65504.0, np.inf], np.float32)
    before = make_model(text, {"hi": hi, "lo": -hi, "eps": np.full(4, 1e-30, np.float32)})
    names, _ = fp16_candidates(before)
    after, report = convert_float16(before, names)
    assert report.values_clipped == 4  # 1e6 and 70000, positive and negative; inf is kept
    assert report.values_underflowed == 4
    stored = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    np.testing.assert_array_equal(stored["hi"], [FLOAT16_MAX, FLOAT16_MAX, FLOAT16_MAX, np.inf])
    np.testing.assert_array_equal(stored["eps"], np.full(4, FLOAT16_TINY, np.float16))
    _check(before, after, {"Min": 1, "Max": 1, "Add": 1, "Cast": 2})


def test_to_float16_keeps_inf_nan_and_signed_zero():
    values = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, -1e-12, 1.5], np.float32)
    half, clipped, underflowed = to_float16(values)
    assert half.dtype == np.float16 and (clipped, underflowed) == (0, 1)
    np.testing.assert_array_equal(half, [np.inf, -np.inf, np.nan, 0, 0, -FLOAT16_TINY, 1.5])
    assert np.signbit(half[3]) and not np.signbit(half[4])


# --- negative cases ------------------------------------------------------------------------------


def test_custom_domain_node_stays_float32():
    text = """<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[2,8] x) => (float[2,8] y, float[2,8] z) <float[2,8] gk> {
    a = Add(x, c)
    gk = com.microsoft.Gelu(a)
    y = Mul(gk, c)
    gu = com.microsoft.Gelu(a)
    z = Mul(gu, c)
}"""
    before = make_model(text, {"c": _weights(8)})
    names, declined = fp16_candidates(before)
    assert names == ["Add_0", "Mul_2"]
    assert declined["Gelu_1"].startswith("not a default-domain op")
    # no value_info for gu, and onnx inference does not know com.microsoft ops
    assert declined["Mul_4"] == "dtype of 'gu' is unknown"
    after, report = convert_float16(before, names)
    # c is read by the float32 Mul_4 too: the float16 nodes get a copy
    assert report.initializers_copied == 1 and _dtype(after, "c") == TensorProto.FLOAT
    gelus = [n for n in after.graph.node if n.op_type == "Gelu"]
    assert [g.input[0] for g in gelus] == ["a", "a"]  # a Cast back to float32 feeds both
    _check(before, after, {"Add": 1, "Gelu": 2, "Mul": 2, "Cast": 4})


def test_if_subgraph_nodes_are_declined_and_read_float32():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,8] x, bool cond) => (float[2,8] y) {
    a = Add(x, k)
    r = If<
        then_branch = t () => (float[2,8] o1) { o1 = Relu(a) },
        else_branch = e () => (float[2,8] o2) { o2 = Neg(a) }
    >(cond)
    y = Mul(r, a)
}"""
    before = make_model(text, {"k": _weights(8)})
    names, declined = fp16_candidates(before)
    assert names == ["Add_0", "Mul_2"]
    assert declined["If_1"] == "If is not in the float16 allow-list"
    assert declined["Relu_0"].startswith("inside a subgraph")
    assert declined["Neg_0"].startswith("inside a subgraph")
    after, report = convert_float16(before, names)
    # the bodies keep reading `a` by name, so `a` is float32 again right after Add
    assert [(c.input[0], c.output[0]) for c in _casts(after)] == [
        ("x", "x_fp16"),
        ("a_fp16", "a"),
        ("r", "r_fp16"),
        ("y_fp16", "y"),
    ]
    for flag in (True, False):
        feeds = {**random_feeds(before), "cond": np.array(flag)}
        _check(before, after, {"Add": 1, "If": 1, "Mul": 1, "Cast": 4}, feeds)
    assert histogram(after, recurse=True)["Relu"] == 1


def test_integer_only_ops_are_untouched_and_shape_needs_no_cast():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,3,4] x) => (float[6,4] y) {
    r = Relu(x)
    s = Shape(r)
    d = Gather<axis = 0>(s, last)
    u = Unsqueeze(d, zero)
    t = Concat<axis = 0>(minus1, u)
    y = Reshape(r, t)
}"""
    before = make_model(
        text,
        {
            "last": np.array(2, np.int64),
            "zero": np.array([0], np.int64),
            "minus1": np.array([-1], np.int64),
        },
    )
    names, declined = fp16_candidates(before)
    assert names == ["Relu_0", "Reshape_5"]
    assert declined["Shape_1"].startswith("reads only the shape")
    for name in ("Gather_2", "Unsqueeze_3", "Concat_4"):
        assert declined[name] == "computes no float32 data"
    after, report = convert_float16(before, names)
    shape = next(n for n in after.graph.node if n.op_type == "Shape")
    assert shape.input[0] == "r_fp16"  # Shape reads the float16 tensor, no Cast for it
    assert all(i.data_type == TensorProto.INT64 for i in after.graph.initializer)
    assert report.casts_inserted == 2 and _casts_only_at_borders(after)
    ops = {"Relu": 1, "Shape": 1, "Gather": 1, "Unsqueeze": 1, "Concat": 1, "Reshape": 1}
    _check(before, after, {**ops, "Cast": 2})


def test_excluded_nodes_stay_float32():
    before = _attention_net()
    names, declined = fp16_candidates(before, exclude=["Softmax", "MatMul_4"])
    assert declined == {
        "MatMul_4": "excluded by 'MatMul_4'",
        "Softmax_6": "excluded by 'Softmax'",
    }
    assert "Softmax_6" not in names and len(names) == 8
    # `Mat` matches no op type in full and no node name: nothing excluded
    assert fp16_candidates(before, exclude=["^Mat$"])[1] == {}
    after, report = convert_float16(before, names)
    casts = [(c.input[0], c.output[0]) for c in _casts(after)]
    # into MatMul_4: q and kt back to float32; out of Softmax: p to float16
    assert ("q_fp16", "q") in casts and ("kt_fp16", "kt") in casts and ("p", "p_fp16") in casts
    assert ("ss_fp16", "ss") in casts  # Mul_5 is float16, Softmax reads float32
    assert report.casts_inserted == 7  # those four, x's, s into Mul_5, y's
    _check(before, after, {**Counter(histogram(before)), "Cast": 7})


def test_shared_initializer_gets_a_float16_copy():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,8] x) => (float[2,8] y) {
    a = Mul(x, s)
    y = Add(a, s)
}"""
    before = make_model(text, {"s": _weights(8)})
    after, report = convert_float16(before, ["Mul_0"])
    assert report.initializers_converted == 1 and report.initializers_copied == 1
    assert _dtype(after, "s") == TensorProto.FLOAT
    assert _dtype(after, "s_fp16") == TensorProto.FLOAT16
    assert [n.input[1] for n in after.graph.node if n.op_type != "Cast"] == ["s_fp16", "s"]
    _check(before, after, {"Mul": 1, "Add": 1, "Cast": 2})


def test_graph_output_in_the_middle_stays_float32():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,8] x) => (float[2,8] a, float[2,8] y) {
    a = Relu(x)
    y = Mul(a, c)
}"""
    before = make_model(text, {"c": _weights(8)})
    names, _ = fp16_candidates(before)
    after, report = convert_float16(before, names)
    # a is written back in float32 for the graph output, while Mul reads a_fp16
    mul = next(n for n in after.graph.node if n.op_type == "Mul")
    assert mul.input[0] == "a_fp16"
    assert report.casts_inserted == 3
    _check(before, after, {"Relu": 1, "Mul": 1, "Cast": 3})


def test_overridable_initializer_is_cast_not_converted():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,8] x, float[8] c) => (float[2,8] y) {
    y = Mul(x, c)
}"""
    before = make_model(text, {"c": _weights(8)})  # c is both an input and an initializer
    after, report = convert_float16(before, ["Mul_0"])
    assert report.initializers_converted == 0 and _dtype(after, "c") == TensorProto.FLOAT
    assert [(c.input[0], c.output[0]) for c in _casts(after)][:2] == [
        ("x", "x_fp16"),
        ("c", "c_fp16"),
    ]
    _check(before, after, {"Mul": 1, "Cast": 3})


def test_bad_selections_and_patterns_are_usage_errors():
    before = _attention_net()
    with pytest.raises(UsageError, match="not in the model: nope"):
        convert_float16(before, ["nope"])
    custom = make_model(
        """<ir_version: 10, opset_import: ["" : 17, "com.example" : 1]>
g (float[2] x) => (float[2] y) { y = com.example.Op(x) }"""
    )
    with pytest.raises(UsageError, match=r"Op_0 \(not a default-domain op"):
        convert_float16(custom, ["Op_0"])
    with pytest.raises(UsageError, match="not a valid regex"):
        fp16_candidates(before, exclude=["("])


def test_empty_selection_changes_nothing():
    before = _conv_net()
    after, report = convert_float16(before, [])
    assert report.converted_nodes == [] and report.casts_inserted == 0
    assert [n.op_type for n in after.graph.node] == CONV_OPS
    assert all(i.data_type == TensorProto.FLOAT for i in after.graph.initializer)
    _check(before, after, dict(Counter(CONV_OPS)))


def test_cast_of_a_constant_keeps_the_exact_float32_value():
    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y, int64[2] n) {
    y = Min(x, c)
    n = Cast<to = 7>(c)
}"""
    before = make_model(text, {"c": np.array([1e5, 2.7], np.float32)})
    names, declined = fp16_candidates(before)
    assert names == ["Min_0"] and declined["Cast_1"] == "computes no float32 data"
    after, report = convert_float16(before, names)
    # in place, c would be clipped to 65504 and rounded to 2.69921875 under the Cast too
    assert report.initializers_copied == 1 and report.values_clipped == 1
    cast = next(n for n in after.graph.node if n.name == "Cast_1")
    assert cast.input[0] == "c" and _dtype(after, "c") == TensorProto.FLOAT
    np.testing.assert_array_equal(run(after, random_feeds(before))[1], [100000, 2])
    _check(before, after, {"Min": 1, "Cast": 3})


# --------------------------------------------------------------------------------------------
# The stage: plan + materialization under the engine's budget search (onnxshrink.quant.lossy)


def _stage_feeds(model: onnx.ModelProto, n: int = 8) -> list[dict[str, np.ndarray]]:
    return [random_feeds(model, seed) for seed in range(n)]


def test_stage_converts_everything_within_a_loose_budget():
    from onnxshrink.quant.lossy import StageSettings
    from onnxshrink.rules import LOSSY_STAGES, lossy_stage
    from onnxshrink.rules.float16 import STAGE

    assert lossy_stage("fp16") is STAGE and STAGE in LOSSY_STAGES
    model = _conv_net()
    result = STAGE.run(model, _stage_feeds(model), StageSettings(max_error=1.0))
    assert result.stage == "fp16" and result.budget.within_budget
    assert [layer.precision for layer in result.quantized] == ["float16"] * len(CONV_OPS)
    assert result.kept_float == [] and result.budget.sessions == 1  # no ranking needed
    assert result.samples == 8 and result.feeds == 8  # eight one-sample feeds measured
    assert result.plan is not None and len(result.plan.applied) == len(CONV_OPS)
    _check(model, result.model, {**Counter(CONV_OPS), "Cast": 2})


def test_stage_keeps_the_most_sensitive_nodes_float32_under_a_tight_budget():
    from onnxshrink.quant.lossy import StageSettings
    from onnxshrink.rules.float16 import STAGE

    model = _conv_net()
    feeds = _stage_feeds(model)
    full = STAGE.run(model, feeds, StageSettings(max_error=1.0)).budget.full_error
    assert full > 0.0
    result = STAGE.run(model, feeds, StageSettings(max_error=full / 4))
    budget = result.budget
    assert budget.ranking and budget.kept_float  # ranked, then some nodes declined
    assert budget.final_error <= full / 4 and budget.within_budget
    kept = {layer.name for layer in result.kept_float}
    assert set(budget.kept_float) <= kept
    assert all("sensitive" in (layer.reason or "") for layer in result.kept_float)
    # the declined nodes are the most sensitive ones of the ranking
    ranked = [e.name for e in budget.ranking]
    assert set(budget.kept_float) == set(ranked[: len(budget.kept_float)])
    onnx.checker.check_model(result.model, full_check=True)
    # a zero budget: only nodes whose float16 version changes nothing at all stay converted
    # (on ORT CPU a lone Relu or MaxPool computes the same values in either type)
    exact = STAGE.run(model, feeds, StageSettings(max_error=0.0))
    assert exact.budget.final_error == 0.0
    assert all(layer.error == 0.0 for layer in exact.quantized)
    assert {"Conv", "Gemm"} <= {layer.op for layer in exact.kept_float}


def test_optimize_quantize_fp16_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from onnxshrink.cli import app

    model = _conv_net()
    path, out, report = tmp_path / "m.onnx", tmp_path / "h.onnx", tmp_path / "r.json"
    onnx.save(model, str(path))
    calib, held_out = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=RNG.normal(0, 1, (8, 3, 8, 8)).astype(np.float32))
    np.savez(held_out, x=RNG.normal(0, 1, (4, 3, 8, 8)).astype(np.float32))
    result = CliRunner().invoke(
        app,
        ["optimize", str(path), "-o", str(out), "--quantize", "fp16",
         "--calibration-data", str(calib), "--inputs", str(held_out), "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fp16 quantization" in result.output and "fp16 vs original" in result.output
    written = onnx.load(str(out))
    assert any(t.data_type == TensorProto.FLOAT16 for t in written.graph.initializer)
    assert written.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    import json

    quant = json.loads(report.read_text())["quantization"]
    assert quant["stage"] == "fp16" and quant["held_out_check"]["verified"]
