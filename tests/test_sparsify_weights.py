"""rules/sparsify_weights.py: unstructured and N:M pruning, --compress storage (issue 11)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.quant.lossy import StageSettings
from onnxshrink.quant.sparsity import SparsifySpec
from onnxshrink.rules import sparsify_weights as sw
from onnxshrink.rules.prune_magnitude import follows_nm, global_threshold, nm_mask, ratio_mask
from onnxshrink.rules.prune_wanda import reconstruction_error, sparsegpt, wanda_mask
from tests.helpers import histogram

K, N = 64, 128


def _model(conv_groups: int = 1, k: int = K, n: int = N, table: bool = False, seed: int = 0):
    """x [b, k] -> MatMul [k, n] -> Relu -> Gemm transB [k, n] (weight [k, n] stored [out, in]);
    img [b, 16, 8, 8] -> Conv [32, 16/g, 3, 3]; optionally ids -> Gather [300, 64]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((k, n)) / 8).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((k, n)) / 8).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b2"),
        numpy_helper.from_array(
            (rng.standard_normal((32, 16 // conv_groups, 3, 3)) / 8).astype(np.float32), "cw"
        ),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm", transB=1),
        helper.make_node(
            "Conv", ["img", "cw"], ["c"], name="conv", pads=[1] * 4, group=conv_groups
        ),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k]),
        helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 16, 8, 8]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", k]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, ["b", 32, 8, 8]),
    ]
    if table:
        inits.append(
            numpy_helper.from_array(rng.standard_normal((300, 64)).astype(np.float32), "t")
        )
        nodes.append(helper.make_node("Gather", ["t", "ids"], ["e"], name="embed"))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["b", 64]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model: onnx.ModelProto, count: int = 12, seed: int = 1, outliers: bool = True):
    rng = np.random.default_rng(seed)
    names = {i.name for i in model.graph.input}
    k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    feeds = []
    for _ in range(count):
        x = rng.standard_normal((8, k)).astype(np.float32)
        if outliers:
            x[:, :4] *= 20.0
        feed = {"x": x, "img": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)}
        if "ids" in names:
            feed["ids"] = rng.integers(0, 300, 8).astype(np.int64)
        feeds.append(feed)
    return feeds


def _settings(spec: str, **kw) -> StageSettings:
    kw.setdefault("max_error", 1e9)  # the raw prune: no unit declined for accuracy
    return StageSettings(sparsity=SparsifySpec.parse(spec), **kw)


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds[0].items() if k in names})


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ---------------------------------------------------------------------------------------------
# Masks and criteria


def test_masks_prune_exactly_the_share_and_the_pattern():
    rng = np.random.default_rng(0)
    scores = rng.random((32, 48))
    assert np.sum(~ratio_mask(scores, 0.5)) == 32 * 24
    per_row = ratio_mask(scores, 0.25, per_axis=0)
    assert (np.sum(~per_row, axis=1) == 12).all()
    keep = nm_mask(scores, 2, 4, axis=1)
    assert follows_nm(np.where(keep, scores, 0), 2, 4, axis=1)
    assert not follows_nm(scores, 2, 4, axis=1)
    t = global_threshold([scores, scores * 2], 0.5)
    assert np.sum(np.concatenate([scores.ravel(), 2 * scores.ravel()]) <= t) == 32 * 48


def test_data_aware_beats_magnitude_on_outlier_channels():
    """A layer whose first input channels carry 20x larger activations: Wanda and SparseGPT keep
    their weights, magnitude does not; output error (on held-out rows) is lower for both."""
    rng = np.random.default_rng(0)
    k, rows = 128, 64
    x = rng.standard_normal((4000, k))
    x[:, :8] *= 20.0
    fit, held = x[:3000], x[3000:]
    w = rng.standard_normal((rows, k)) / np.sqrt(k)
    h_fit, h_held = fit.T @ fit, held.T @ held
    magnitude = np.where(ratio_mask(np.abs(w), 0.5), w, 0.0)
    wanda = np.where(wanda_mask(w, np.sqrt(np.diag(h_fit)), 0.5), w, 0.0)
    second = sparsegpt(w, h_fit, 0.5)
    errors = [reconstruction_error(w, p, h_held) for p in (magnitude, wanda, second)]
    assert errors[1] < 0.5 * errors[0], errors
    assert errors[2] < errors[1], errors
    for pruned in (wanda, second):
        assert np.mean(pruned == 0) == 0.5


# ---------------------------------------------------------------------------------------------
# The stages


@pytest.mark.parametrize("criterion", ["magnitude", "auto"])
def test_two_four_pattern_on_every_pruned_weight(criterion):
    model = _model()
    feeds = _feeds(model)
    result = sw.SparsifyStage("n:m", criterion).run(model, feeds, _settings("2:4"))
    assert {layer.name for layer in result.quantized} == {"mm", "gemm", "conv"}
    assert {layer.precision for layer in result.quantized} == {"2:4"}
    after = _weights(result.model)
    assert follows_nm(after["w1"], 2, 4, axis=0)  # MatMul [K, N]: along K
    assert follows_nm(after["w2"], 2, 4, axis=1)  # Gemm transB [N, K]: along K
    assert follows_nm(after["cw"], 2, 4, axis=1)  # Conv [O, I, kh, kw]: along I
    for name in ("w1", "w2", "cw"):
        assert np.mean(after[name] == 0) == 0.5, name
    assert np.array_equal(after["b2"], _weights(model)["b2"])  # biases untouched
    assert histogram(result.model) == histogram(model)
    onnx.checker.check_model(result.model, full_check=True)
    expected = "magnitude 3" if criterion == "magnitude" else "wanda"
    assert expected in result.notes[0]
    got, ref = _run(result.model, feeds), _run(model, feeds)
    for g, r in zip(got, ref, strict=True):  # a prune: close, not equal
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 0.8
        assert not np.array_equal(g, r)


def test_unstructured_prunes_each_layer_and_table_rows():
    model = _model(table=True)
    feeds = _feeds(model)
    result = sw.UNSTRUCTURED.run(model, feeds, _settings("unstructured:0.5"))
    assert {layer.name for layer in result.quantized} == {"mm", "gemm", "conv", "embed"}
    assert {layer.precision for layer in result.quantized} == {"sparse 50%"}
    after = _weights(result.model)
    for name in ("w1", "w2", "cw", "t"):
        assert np.mean(after[name] == 0) == pytest.approx(0.5, abs=1e-3), name
    assert (np.sum(after["t"] == 0, axis=1) == 32).all()  # each token's row its own half
    assert "magnitude 1" in result.notes[0]  # the table: no input activation
    onnx.checker.check_model(result.model, full_check=True)
    assert len(_run(result.model, feeds)) == 3


def test_random_calibration_uses_magnitude():
    model = _model()
    result = sw.UNSTRUCTURED.run(model, "random", _settings("unstructured:0.5"))
    assert "magnitude 3" in result.notes[0] and "random" in result.notes[0]


def test_global_magnitude_shares_one_threshold():
    model = _model()
    stage = sw.SparsifyStage("unstructured", "global-magnitude")
    result = stage.run(model, "random", _settings("unstructured:0.5"))
    after = _weights(result.model)
    pruned = np.concatenate([after[n].ravel() for n in ("w1", "w2", "cw")])
    assert np.mean(pruned == 0) == pytest.approx(0.5, abs=1e-3)
    before = _weights(model)
    kept_min = min(np.abs(after[n][after[n] != 0]).min() for n in ("w1", "w2", "cw"))
    dropped_max = max(np.abs(before[n][after[n] == 0]).max() for n in ("w1", "w2", "cw"))
    assert dropped_max <= kept_min


def test_budget_keeps_sensitive_layers_dense():
    model = _model()
    result = sw.UNSTRUCTURED.run(model, "random", _settings("unstructured:0.9", max_error=1e-4))
    assert result.kept_float and all("sensitive" in (x.reason or "") for x in result.kept_float)
    assert result.budget.final_error <= 1e-4


# ---------------------------------------------------------------------------------------------
# --compress


def test_compress_round_trip_equals_dense():
    model = _model(table=True)
    feeds = _feeds(model)
    dense = sw.UNSTRUCTURED.run(model, feeds, _settings("unstructured:0.5")).model
    packed = sw.UNSTRUCTURED.run(model, feeds, _settings("unstructured:0.5", compress=True))
    assert "4 pruned weight(s) stored packed" in packed.notes[-1]
    onnx.checker.check_model(packed.model, full_check=True)
    ops = histogram(packed.model)
    assert ops["BitShift"] == 4 and ops["CumSum"] == 4
    assert packed.model.ByteSize() < 0.6 * dense.ByteSize()
    for got, ref in zip(_run(packed.model, feeds), _run(dense, feeds), strict=True):
        assert np.array_equal(got, ref)


@pytest.mark.parametrize("shape", [(63, 129), (8, 8, 3, 5)])
def test_masked_initializers_odd_sizes(shape):
    """Sizes that are not a multiple of 8 (the mask's padding cut off), any rank."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < 0.6] = 0
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"], name="id")],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    packed = sw.to_masked_initializers(model, ["w"])
    onnx.checker.check_model(packed, full_check=True)
    assert not [t for t in packed.graph.initializer if t.name == "w"]
    assert np.array_equal(_run(packed, [{}])[0], w)


def test_sparse_initializers_load_and_equal_dense_where_smaller():
    rng = np.random.default_rng(0)
    model = _model()
    w = _weights(model)["w1"].copy()
    w[rng.random(w.shape) < 0.8] = 0  # 80%: int64 indices (12 bytes a value) shrink it
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    sparse = sw.to_sparse_initializers(model, ["w1", "w2"])  # w2 dense: not smaller, kept
    assert [s.values.name for s in sparse.graph.sparse_initializer] == ["w1"]
    assert sparse.graph.sparse_initializer[0].indices.data_type == TensorProto.INT64
    onnx.checker.check_model(sparse)  # full_check cannot infer through sparse initializers
    feeds = _feeds(model)
    for got, ref in zip(_run(sparse, feeds), _run(model, feeds), strict=True):
        assert np.array_equal(got, ref)
    packed, report = sw.compress_weights(model, ["w1", "w2"])
    assert (report.masked, report.sparse, report.dense) == (1, 0, 1)  # the mask is smaller
    assert report.stored_bytes < report.dense_bytes


# ---------------------------------------------------------------------------------------------
# Negative cases


def _matmul(weight_shape, constant: bool = True, op: str = "MatMul"):
    rng = np.random.default_rng(0)
    k, n = weight_shape
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])]
    inits = []
    if constant:
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n]))
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], name="mm")],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_no_prunable_layer_is_one_line_usage_error():
    with pytest.raises(sw.NothingToPrune) as err:
        sw.UNSTRUCTURED.run(
            _matmul((64, 128), constant=False), "random", _settings("unstructured:0.5")
        )
    assert isinstance(err.value, UsageError)
    assert "nothing to prune" in str(err.value) and "\n" not in str(err.value)


def test_small_weights_declined_then_nothing_to_prune():
    with pytest.raises(sw.NothingToPrune, match="under 4096"):
        sw.UNSTRUCTURED.run(_matmul((16, 16)), "random", _settings("unstructured:0.5"))


def test_nm_declines_shapes_tensorrt_does_not_take():
    model = _model(conv_groups=2, table=True)
    job = sw._SparsifyJob(SparsifySpec.parse("2:4"), _settings("2:4"), "random")
    from onnxshrink.quant.targets import target_profile

    plan = job.plan(model, target_profile("ort-cpu"), ())
    assert set(plan.applied) == {"mm", "gemm"}
    assert "grouped Conv" in plan.declined["conv"]
    assert "table lookup" in plan.declined["embed"]
    odd = sw._SparsifyJob(SparsifySpec.parse("2:4"), _settings("2:4"), "random")
    with pytest.raises(sw.NothingToPrune, match="not a multiple of 16"):
        odd.plan(_matmul((72, 128)), target_profile("ort-cpu"), ())
    with pytest.raises(sw.NothingToPrune, match="not a multiple of 8"):
        odd.plan(_matmul((64, 100)), target_profile("ort-cpu"), ())
    three = sw._SparsifyJob(SparsifySpec.parse("1:3"), _settings("1:3"), "random")
    with pytest.raises(sw.NothingToPrune, match="multiple of M=3"):
        three.plan(_matmul((64, 128)), target_profile("ort-cpu"), ())


def test_excluded_and_shared_weights_are_declined():
    model = _model()
    result = sw.UNSTRUCTURED.run(
        model, "random", _settings("unstructured:0.5", exclude=("Conv", "^gemm$"))
    )
    declined = {x.name: x.reason for x in result.kept_float}
    assert declined == {"conv": "excluded by 'Conv'", "gemm": "excluded by '^gemm$'"}
    assert np.array_equal(_weights(result.model)["cw"], _weights(model)["cw"])
    shared = _model()
    shared.graph.node.append(helper.make_node("Identity", ["w1"], ["w1_copy"], name="copy"))
    shared.graph.output.append(helper.make_tensor_value_info("w1_copy", TensorProto.FLOAT, [K, N]))
    result = sw.UNSTRUCTURED.run(shared, "random", _settings("unstructured:0.5"))
    assert {x.name: x.reason for x in result.kept_float} == {"mm": "weight also read by 'copy'"}


def test_check_refuses_other_kinds():
    with pytest.raises(UsageError, match="not a n:m pattern"):
        sw.NM.check(_settings("unstructured:0.5"))
    with pytest.raises(UsageError, match="--sparsify"):
        sw.UNSTRUCTURED.check(StageSettings())
    with pytest.raises(UsageError, match="criterion"):
        sw.SparsifyStage("unstructured", "random-guess")
    assert Counter([sw.UNSTRUCTURED.name, sw.NM.name]) == Counter(["unstructured", "n:m"])
