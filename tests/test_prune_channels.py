"""`--sparsify channels:R`: channel groups of conv nets (`rules/channels_conv.py`) and the
pruning stage with teacher-guided reconstruction (`rules/prune_channels.py`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.engine.io import named_copy
from onnxshrink.errors import UsageError
from onnxshrink.quant.lossy import StageSettings
from onnxshrink.quant.sparsity import SparsifySpec
from onnxshrink.rules import channels_conv, prune_channels
from tests.helpers import histogram, make_model, run

HEAD = '<ir_version: 8, opset_import: ["" : 13]>\n'
RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def _b(n: int) -> np.ndarray:
    return (0.1 * RNG.standard_normal(n)).astype(np.float32)


def _chain(depthwise: bool = False) -> onnx.ModelProto:
    """x -> Conv(12) -> Relu [-> depthwise Conv -> Relu] -> Conv(8) -> y."""
    middle = (
        "d = Conv<group = 12, pads = [1, 1, 1, 1]>(r, wd, bd)\n    s = Relu(d)"
        if depthwise
        else "s = Identity(r)"
    )
    inits = {"w1": _w(12, 3, 3, 3), "b1": _b(12), "w2": _w(8, 12, 3, 3), "b2": _b(8)}
    if depthwise:
        inits |= {"wd": _w(12, 1, 3, 3), "bd": _b(12)}
    return make_model(
        HEAD
        + f"""g (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {{
    c = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    r = Relu(c)
    {middle}
    y = Conv<pads = [1, 1, 1, 1]>(s, w2, b2)
}}""",
        inits,
    )


def _residual() -> onnx.ModelProto:
    """Two convs of the same input added (a residual): their channels go together."""
    return make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {
    a = Conv<pads = [1, 1, 1, 1]>(x, wa, ba)
    ra = Relu(a)
    b = Conv(ra, wb, bb)
    s = Add(ra, b)
    t = Mul(s, k)
    y = Conv(t, wc, bc)
}""",
        {
            "wa": _w(12, 3, 3, 3),
            "ba": _b(12),
            "wb": _w(12, 12, 1, 1),
            "bb": _b(12),
            "k": np.full((1, 12, 1, 1), 0.5, np.float32),
            "wc": _w(8, 12, 1, 1),
            "bc": _b(8),
        },
    )


def _concat() -> onnx.ModelProto:
    return make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {
    a = Conv<pads = [1, 1, 1, 1]>(x, wa, ba)
    b = Conv<pads = [1, 1, 1, 1]>(x, wb, bb)
    ra = Relu(a)
    rb = Relu(b)
    c = Concat<axis = 1>(ra, rb)
    y = Conv<pads = [1, 1, 1, 1]>(c, wc, bc)
}""",
        {
            "wa": _w(12, 3, 3, 3),
            "ba": _b(12),
            "wb": _w(10, 3, 3, 3),
            "bb": _b(10),
            "wc": _w(8, 22, 3, 3),
            "bc": _b(8),
        },
    )


def _gemm_head() -> onnx.ModelProto:
    return make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x) => (float[1, 5] y) {
    a = Conv<pads = [1, 1, 1, 1]>(x, wa, ba)
    r = Relu(a)
    p = GlobalAveragePool(r)
    f = Flatten<axis = 1>(p)
    y = Gemm(f, wg, bg)
}""",
        {"wa": _w(12, 3, 3, 3), "ba": _b(12), "wg": _w(12, 5), "bg": _b(5)},
    )


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # smooth images: neighbouring pixels correlate, as in real inputs
    base = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
    images = base.repeat(2, axis=2).repeat(2, axis=3)
    images += 0.1 * rng.standard_normal(images.shape).astype(np.float32)
    return [{"x": images[i : i + 1]} for i in range(n)]


def _prune(model, ratio=0.25, max_error=1e9, reconstruct=True, exclude=(), calib=80):
    stage = prune_channels.ChannelPruneStage()
    stage.reconstruct = reconstruct
    settings = StageSettings(
        max_error=max_error, sparsity=SparsifySpec.parse(f"channels:{ratio}"), exclude=exclude
    )
    return stage.run(model, _feeds(calib, 1), settings)


def _error(before: onnx.ModelProto, after: onnx.ModelProto) -> float:
    num = den = 0.0
    for feed in _feeds(16, 99):  # held out: another seed than the calibration's
        (ref,) = run(before, feed)
        (got,) = run(after, feed)
        num += float(((ref - got) ** 2).sum())
        den += float((ref**2).sum())
    return num / den


def _groups(model: onnx.ModelProto):
    """The finder on the model with its nodes named, as the stage gives it."""
    return channels_conv.channel_groups(named_copy(model))


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def _interface(model: onnx.ModelProto) -> list:
    return [(v.name, v.type.SerializeToString()) for v in (*model.graph.input, *model.graph.output)]


def _check(before: onnx.ModelProto, after: onnx.ModelProto, max_error: float = 0.5) -> None:
    onnx.checker.check_model(after, full_check=True)
    assert histogram(after) == histogram(before)
    assert _interface(after) == _interface(before)
    assert _error(before, after) < max_error


# -- positive cases ------------------------------------------------------------------------


def test_chain_conv_relu_conv_shrinks_and_runs():
    model = _chain()
    result = _prune(model)
    dims = _dims(result.model)
    assert dims["w1"] == [9, 3, 3, 3] and dims["b1"] == [9]
    assert dims["w2"] == [8, 9, 3, 3]
    # the group's two units (case 8): up to half the ratio, and the rest
    assert [u.name for u in result.quantized] == ["Conv_0", "Conv_0 (second half)"]
    _check(model, result.model)


def test_depthwise_conv_passes_channels_and_its_group_is_set():
    model = _chain(depthwise=True)
    result = _prune(model)
    dims = _dims(result.model)
    assert dims["wd"] == [9, 1, 3, 3] and dims["bd"] == [9] and dims["w2"] == [8, 9, 3, 3]
    depthwise = next(n for n in result.model.graph.node if "wd" in n.input)
    assert onnx.helper.get_attribute_value(depthwise.attribute[0]) == 9
    _check(model, result.model)


def test_residual_add_ties_both_producers_into_one_group():
    groups, declined = _groups(_residual())
    assert list(declined) == ["Conv_5"]  # the last conv's channels are the graph's output
    tied = [g for g in groups if len([s for s in g.producers if s.tensor in ("wa", "wb")]) == 2]
    assert len(tied) == 1 and tied[0].width == 12
    assert {s.tensor for s in tied[0].producers} == {"wa", "ba", "wb", "bb", "k"}
    model = _residual()
    result = _prune(model)
    dims = _dims(result.model)
    assert dims["wa"][0] == dims["wb"][0] == dims["wb"][1] == dims["wc"][1] == 9
    assert dims["k"] == [1, 9, 1, 1]
    _check(model, result.model)


def test_concat_maps_each_input_to_its_offset():
    groups, _ = _groups(_concat())
    offsets = {g.unit: [c.weight.offset for c in g.consumers] for g in groups}
    assert sorted(offsets.values()) == [[0], [12]]
    model = _concat()
    result = _prune(model)
    dims = _dims(result.model)
    assert dims["wa"][0] == 9 and dims["wb"][0] == 8 and dims["wc"][1] == 17
    _check(model, result.model)


def test_gemm_head_after_global_pool_and_flatten():
    model = _gemm_head()
    result = _prune(model)
    dims = _dims(result.model)
    assert dims["wa"][0] == 9 and dims["wg"] == [9, 5]
    _check(model, result.model)


def test_reconstruction_at_least_halves_the_error_of_the_same_pruning():
    model = _chain()
    with_fit = _prune(model, ratio=0.5)
    without = _prune(model, ratio=0.5, reconstruct=False)
    assert _dims(with_fit.model)["w2"] == _dims(without.model)["w2"] == [8, 6, 3, 3]
    fitted, plain = _error(model, with_fit.model), _error(model, without.model)
    assert fitted < 0.5 * plain, (fitted, plain)
    assert any("refit" in note for note in with_fit.notes)


def test_a_larger_ratio_removes_more_channels():
    model = _chain()
    assert _dims(_prune(model, ratio=0.25).model)["w1"][0] == 9
    assert _dims(_prune(model, ratio=0.75).model)["w1"][0] == 3


def test_a_group_too_sensitive_at_the_ratio_is_pruned_at_half_of_it():
    """A budget between the error at R/2 and at R: the second half is declined, the first
    kept, so the group ends at R/2 (per-layer ratios, case 8)."""
    model = _chain()
    full = _prune(model, ratio=0.5).budget.final_error
    half = _prune(model, ratio=0.25).budget.final_error
    assert half < full
    result = _prune(model, ratio=0.5, max_error=(half + full) / 2)
    assert [u.name for u in result.quantized] == ["Conv_0"]
    assert [u.name for u in result.kept_float] == ["Conv_0 (second half)"]
    assert _dims(result.model)["w1"] == [9, 3, 3, 3]  # 12 channels, 3 removed: R/2 of 0.5
    _check(model, result.model)


def test_the_budget_leaves_a_too_sensitive_group_dense():
    model = _concat()
    result = _prune(model, ratio=0.75, max_error=1e-6)
    assert result.quantized == []
    assert all(layer.reason for layer in result.kept_float)
    assert result.model.graph.initializer[0].dims == model.graph.initializer[0].dims


# -- negative cases ------------------------------------------------------------------------


def test_channels_reaching_a_graph_output_are_declined():
    model = make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x) => (float[1, 12, 8, 8] y) {
    c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
    y = Relu(c)
}""",
        {"w": _w(12, 3, 3, 3), "b": _b(12)},
    )
    groups, declined = _groups(model)
    assert groups == [] and "graph output 'y'" in declined["Conv_0"]
    with pytest.raises(prune_channels.NothingToPrune) as info:
        _prune(model)
    assert "\n" not in str(info.value) and isinstance(info.value, UsageError)


def test_an_unmodelled_op_on_the_channels_declines_the_group():
    model = make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {
    c = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    s = Softmax<axis = 1>(c)
    y = Conv(s, w2, b2)
}""",
        {"w1": _w(12, 3, 3, 3), "b1": _b(12), "w2": _w(8, 12, 1, 1), "b2": _b(8)},
    )
    groups, declined = _groups(model)
    assert [g.unit for g in groups] == []
    assert "Softmax" in declined["Conv_0"]


def test_a_conv_whose_weight_is_not_constant_makes_no_group():
    model = make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x, float[12, 3, 3, 3] w1) => (float[1, 8, 8, 8] y) {
    c = Conv<pads = [1, 1, 1, 1]>(x, w1)
    y = Conv(c, w2, b2)
}""",
        {"w2": _w(8, 12, 1, 1), "b2": _b(8)},
    )
    groups, declined = _groups(model)
    assert groups == [] and "Conv_0" not in declined  # not a producer: nothing to decline


def test_a_model_whose_weights_are_all_computed_says_so_in_one_line():
    model = make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x) => (float[1, 12, 8, 8] y) {
    w = Add(wa, wb)
    y = Conv<pads = [1, 1, 1, 1]>(x, w)
}""",
        {"wa": _w(12, 3, 3, 3), "wb": _w(12, 3, 3, 3)},
    )
    with pytest.raises(
        prune_channels.NothingToPrune, match="no Conv, Gemm or MatMul has a"
    ) as info:
        _prune(model)
    assert "\n" not in str(info.value)


def test_a_slice_of_the_channels_declines_the_group():
    model = make_model(
        HEAD
        + """g (float[1, 3, 8, 8] x) => (float[1, 8, 8, 8] y) {
    c = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    s = Slice(c, starts, ends, axes)
    y = Conv(s, w2, b2)
}""",
        {
            "w1": _w(12, 3, 3, 3),
            "b1": _b(12),
            "starts": np.array([0], np.int64),
            "ends": np.array([6], np.int64),
            "axes": np.array([1], np.int64),
            "w2": _w(8, 6, 1, 1),
            "b2": _b(8),
        },
    )
    groups, declined = _groups(model)
    assert groups == [] and "Slice" in declined["Conv_0"]


def test_exclude_keeps_a_group_dense():
    model = _chain()
    with pytest.raises(prune_channels.NothingToPrune, match="excluded by"):
        _prune(model, exclude=("Conv_3",))


def test_a_constant_shared_with_another_group_is_copied_per_reader():
    # both convs read the same bias values: each group gets its own copy, merged back when
    # the copies stay equal
    model = _concat()
    shared = _b(12)
    for t in model.graph.initializer:
        if t.name == "ba":
            t.CopyFrom(onnx.numpy_helper.from_array(shared, "ba"))
    result = _prune(model)
    _check(model, result.model)


def test_settings_without_a_channels_spec_are_refused_in_one_line():
    for spec in (None, SparsifySpec.parse("unstructured:0.5")):
        with pytest.raises(UsageError) as info:
            prune_channels.STAGE.check(StageSettings(sparsity=spec))
        assert "\n" not in str(info.value)
    for bad in ("channels:0", "channels:1.5", "channels"):
        with pytest.raises(UsageError):
            SparsifySpec.parse(bad)
