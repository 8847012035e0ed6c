"""Tests for rules/smooth_matmul.py: SmoothQuant-style activation smoothing before MatMuls."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.rules.smooth_matmul import (
    SCALE_MAX,
    SCALE_MIN,
    ChannelAbsMax,
    smooth_matmuls,
    smoothable_tensors,
    smoothing_scales,
)
from tests.helpers import assert_unchanged, histogram, make_model, random_feeds, run

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'

# LayerNormalization -> MatMul -> Relu -> MatMul: both MatMul inputs are smoothable.
MLP = f"""{HEADER}
g (float[2,6,16] x) => (float[2,6,8] y) {{
    n = LayerNormalization <axis = -1> (x, gamma, beta)
    h = MatMul (n, w1)
    r = Relu (h)
    y = MatMul (r, w2)
}}
"""


def _rand(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _mlp(gamma_outlier: float = 30.0) -> onnx.ModelProto:
    gamma = np.random.default_rng(5).uniform(0.5, 1.5, 16).astype(np.float32)
    gamma[3] = gamma_outlier  # one outlier channel, as transformers' LayerNorms have
    return make_model(
        MLP,
        {
            "gamma": gamma,
            "beta": _rand((16,), 6, 0.1),
            "w1": _rand((16, 32), 1, 0.2),
            "w2": _rand((32, 8), 2, 0.2),
        },
    )


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    for name in names:
        extended.graph.output.append(
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    return extended


def _channel_absmax(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Calibrate per-channel max |x| of intermediate tensors with ChannelAbsMax."""
    observers = {name: ChannelAbsMax() for name in names}
    extended = _with_outputs(model, names)
    skip = len(model.graph.output)
    for feed in feeds:
        for name, array in zip(names, run(extended, feed)[skip:], strict=True):
            observers[name].update(array)
    values = {name: obs.value() for name, obs in observers.items()}
    return {name: value for name, value in values.items() if value is not None}


def _feeds(model: onnx.ModelProto, count: int = 4) -> list[dict[str, np.ndarray]]:
    return [random_feeds(model, seed) for seed in range(count)]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(tensor)


def _assert_float_parity(before: onnx.ModelProto, after: onnx.ModelProto, rel: float) -> None:
    """Outputs agree within `rel` of each output's peak (smoothing is exact up to rounding)."""
    for seed in range(3):
        feeds = random_feeds(before, 100 + seed)
        for ref, got in zip(run(before, feeds), run(after, feeds), strict=True):
            np.testing.assert_allclose(got, ref, rtol=rel, atol=rel * float(np.abs(ref).max()))


def _smoothed(model: onnx.ModelProto, alpha: float = 0.5, **kwargs):
    names = list(smoothable_tensors(model))
    amax = _channel_absmax(model, names, _feeds(model))
    return smooth_matmuls(model, amax, alpha, **kwargs)


# --- positive cases ------------------------------------------------------------------------


def test_smoothable_tensors_of_mlp():
    # unnamed nodes are named <op>_<index>, as onnxshrink.rules.qdq names them
    assert smoothable_tensors(_mlp()) == {"n": ["MatMul_1"], "r": ["MatMul_3"]}


def test_smoothing_is_exact_in_float():
    model = _mlp()
    after, report = _smoothed(model, 0.5)
    assert set(report.smoothed) == {"n", "r"}
    assert report.smoothed["n"] > 2.0  # the outlier channel moved into the weights
    assert report.skipped == {}
    assert histogram(after) == {"LayerNormalization": 1, "MatMul": 2, "Relu": 1, "Mul": 2}
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == ["y"]
    assert [i.name for i in after.graph.input] == ["x"]
    _assert_float_parity(model, after, 1e-5)
    # one Mul right after each producer; the MatMuls read its output and new weights
    ops = [n.op_type for n in after.graph.node]
    assert ops == ["LayerNormalization", "Mul", "MatMul", "Relu", "Mul", "MatMul"]
    mm1 = after.graph.node[2]
    assert list(mm1.input) == [report.outputs["n"], "w1_smoothed"]
    inits = {t.name for t in after.graph.initializer}
    assert "w1" not in inits and "w2" not in inits  # the old weights are dropped
    assert not np.allclose(_init(after, "w1_smoothed"), _init(model, "w1"))
    assert model.graph.node[1].input[1] == "w1"  # the input model is kept


def test_scales_follow_the_formula():
    model = _mlp()
    amax = _channel_absmax(model, ["n", "r"], _feeds(model))
    w1 = _init(model, "w1").astype(np.float64)
    for alpha in (0.0, 0.5, 1.0):
        after, _ = smooth_matmuls(model, amax, alpha, tensors=["n"])
        assert histogram(after) == {"LayerNormalization": 1, "MatMul": 2, "Relu": 1, "Mul": 1}
        onnx.checker.check_model(after, full_check=True)
        _assert_float_parity(model, after, 1e-5)
        s = 1.0 / _init(after, "n_smooth_inv_scale").astype(np.float64)
        expected = amax["n"] ** alpha / np.abs(w1).max(axis=1) ** (1 - alpha)
        np.testing.assert_allclose(s, expected, rtol=1e-6)
        scaled = _init(after, "w1_smoothed").astype(np.float64)
        if alpha == 0.0:  # every weight row peaks at 1
            np.testing.assert_allclose(np.abs(scaled).max(axis=1), 1.0, rtol=1e-6)
        if alpha == 1.0:  # every channel of x / s peaks at 1 on the calibration data
            np.testing.assert_allclose(s, amax["n"], rtol=1e-6)


def test_smoothing_scales_zero_and_clamp():
    a = np.array([0.0, 4.0, 1e12, 1e-12, 2.0])
    w = np.array([1.0, 0.0, 1.0, 1.0, 0.5])
    s = smoothing_scales(a, w, 0.5)
    assert s[0] == 1.0 and s[1] == 1.0  # a zero maximum on either side: s = 1
    assert s[2] == SCALE_MAX and s[3] == SCALE_MIN
    assert s[4] == pytest.approx(np.sqrt(2.0) / np.sqrt(0.5))


def test_two_readers_share_one_mul():
    # Q/K/V-like: one activation, three projections; one s from the max over all weights
    text = f"""{HEADER}
    g (float[2,6,16] x) => (float[2,6,8] q, float[2,6,8] k, float[2,6,8] v) {{
        n = LayerNormalization <axis = -1> (x, gamma, beta)
        q = MatMul (n, wq)
        k = MatMul (n, wk)
        v = MatMul (n, wv)
    }}
    """
    gamma = np.ones(16, np.float32)
    gamma[7] = 50.0
    weights = {"gamma": gamma, "beta": _rand((16,), 6, 0.1)}
    weights |= {name: _rand((16, 8), i, 0.2) for i, name in enumerate(("wq", "wk", "wv"))}
    model = make_model(text, weights)
    assert smoothable_tensors(model) == {"n": ["MatMul_1", "MatMul_2", "MatMul_3"]}
    after, report = _smoothed(model, 0.5)
    assert histogram(after) == {"LayerNormalization": 1, "MatMul": 3, "Mul": 1}
    onnx.checker.check_model(after, full_check=True)
    _assert_float_parity(model, after, 1e-5)
    for node in after.graph.node[2:]:
        assert node.input[0] == report.outputs["n"]
    w = np.max([np.abs(_init(model, n)).max(axis=1) for n in ("wq", "wk", "wv")], axis=0)
    s = 1.0 / _init(after, "n_smooth_inv_scale").astype(np.float64)
    amax = _channel_absmax(model, ["n"], _feeds(model))["n"]
    np.testing.assert_allclose(s, np.sqrt(amax / w), rtol=1e-6)


def test_smoothing_reduces_int8_error():
    # one channel 100x the others: per-tensor uint8 on x leaves the others a few levels
    text = f"""{HEADER}
    g (float[4,16,16] u) => (float[4,16,32] y) {{
        x = LayerNormalization <axis = -1> (u, gamma, beta)
        y = MatMul (x, w)
    }}
    """
    gamma = np.random.default_rng(3).uniform(0.5, 1.5, 16).astype(np.float32)
    gamma[3] = 100.0
    model = make_model(
        text, {"gamma": gamma, "beta": _rand((16,), 4, 0.1), "w": _rand((16, 32), 2)}
    )
    calib = _feeds(model, 8)
    amax = _channel_absmax(model, ["x"], calib)
    test_feeds = [random_feeds(model, 50 + i) for i in range(4)]
    base = _int8_nsr(model, model, "x", "w", test_feeds)
    for alpha in (0.5, 0.6, 0.7):
        after, report = smooth_matmuls(model, amax, alpha)
        assert histogram(after) == {"LayerNormalization": 1, "Mul": 1, "MatMul": 1}
        onnx.checker.check_model(after, full_check=True)
        _assert_float_parity(model, after, 1e-5)
        nsr = _int8_nsr(model, after, report.outputs["x"], "w_smoothed", test_feeds)
        assert nsr * 3 <= base, f"alpha {alpha}: NSR {nsr:.3g} vs {base:.3g} unsmoothed"


def _int8_nsr(
    reference: onnx.ModelProto,
    model: onnx.ModelProto,
    activation: str,
    weight: str,
    feeds: list[dict[str, np.ndarray]],
) -> float:
    """Output NSR sum((q - f)^2) / sum(f^2) of `activation @ weight` simulated in int8:
    activation uint8 per tensor (range from these feeds, widened to 0), weight int8 per column."""
    extended = _with_outputs(model, [activation])
    acts = [run(extended, feed)[1].astype(np.float64) for feed in feeds]
    lo = min(0.0, min(float(a.min()) for a in acts))
    hi = max(0.0, max(float(a.max()) for a in acts))
    scale = (hi - lo) / 255.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    w = _init(model, weight).astype(np.float64)
    w_scale = np.where(np.abs(w).max(axis=0) > 0, np.abs(w).max(axis=0) / 127.0, 1.0)
    w_q = np.clip(np.round(w / w_scale), -127, 127) * w_scale
    noise = signal = 0.0
    for feed, act in zip(feeds, acts, strict=True):
        a_q = (np.clip(np.round(act / scale) + zero, 0, 255) - zero) * scale
        (f,) = run(reference, feed)
        noise += float(((a_q @ w_q - f) ** 2).sum())
        signal += float((f.astype(np.float64) ** 2).sum())
    return noise / signal


def test_restricted_to_named_tensors():
    model = _mlp()
    after, report = _smoothed(model, 0.5, tensors=["r", "h"])
    assert set(report.smoothed) == {"r"}
    assert report.skipped["h"] == "not read by a MatMul of the main graph"
    assert histogram(after) == {"LayerNormalization": 1, "MatMul": 2, "Relu": 1, "Mul": 1}
    onnx.checker.check_model(after, full_check=True)
    _assert_float_parity(model, after, 1e-5)


def test_channel_absmax_streams_and_ignores_non_finite():
    obs = ChannelAbsMax()
    assert obs.value() is None
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 5, 4)).astype(np.float32) for _ in range(3)]
    arrays[1][0, 0, 2] = np.nan
    arrays[2][1, 1, 1] = np.inf
    arrays[2][1, 2, 0] = -np.inf
    obs.update(arrays[0])
    size = obs.nbytes
    for array in arrays[1:]:
        obs.update(array)
    obs.update(np.full((2, 4), np.nan, np.float32))  # any leading shape; all-NaN adds nothing
    assert obs.nbytes == size  # bounded: one vector of K
    finite = np.concatenate([a.reshape(-1, 4) for a in arrays])
    expected = np.where(np.isfinite(finite), np.abs(finite), 0).max(axis=0)
    np.testing.assert_array_equal(obs.value(), expected)
    with pytest.raises(ValueError, match="channel count changed"):
        obs.update(np.zeros((2, 3), np.float32))


# --- negative cases ------------------------------------------------------------------------


def _assert_not_smoothed(
    model: onnx.ModelProto, tensor: str, reason: str, keep_other_readers: bool = False
) -> None:
    assert tensor not in smoothable_tensors(model, keep_other_readers=keep_other_readers)
    amax = {tensor: _outlier_maxima(_k(model, tensor))}
    after, report = smooth_matmuls(
        model, amax, 0.5, tensors=[tensor], keep_other_readers=keep_other_readers
    )
    assert report.smoothed == {}
    assert reason in report.skipped[tensor], report.skipped
    assert_unchanged(model, after)


def _assert_smoothed_beside_others(model: onnx.ModelProto, tensor: str, matmuls: list[str]) -> None:
    """keep_other_readers (case 1b): the MatMuls read x / s, every other reader still reads x."""
    assert smoothable_tensors(model, keep_other_readers=True) == {tensor: matmuls}
    amax = {tensor: _outlier_maxima(_k(model, tensor))}
    after, report = smooth_matmuls(model, amax, 0.5, keep_other_readers=True)
    assert set(report.smoothed) == {tensor}
    assert histogram(after) == histogram(model) + Counter({"Mul": 1})
    onnx.checker.check_model(after, full_check=True)
    assert [i.name for i in after.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in model.graph.output]
    _assert_float_parity(model, after, 1e-5)
    for node in after.graph.node:
        if node.name in matmuls:
            assert node.input[0] == report.outputs[tensor]
        elif node.op_type != "Mul" or node.output[0] != report.outputs[tensor]:
            assert report.outputs[tensor] not in node.input


def _outlier_maxima(k: int) -> np.ndarray:
    amax = np.full(k, 3.0)
    amax[1] = 300.0
    return amax


def _k(model: onnx.ModelProto, tensor: str) -> int:
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == tensor)
    b = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
    return int(b.dims[0]) if b is not None and len(b.dims) == 2 else 16


def test_activation_also_read_by_add():
    text = f"""{HEADER}
    g (float[2,16] x) => (float[2,8] y, float[2,16] z) {{
        n = Relu (x)
        y = MatMul (n, w)
        z = Add (n, x)
    }}
    """
    model = make_model(text, {"w": _rand((16, 8), 1)})
    _assert_not_smoothed(model, "n", "also read by Add")
    _assert_smoothed_beside_others(model, "n", ["MatMul_1"])


def test_shared_weight():
    text = f"""{HEADER}
    g (float[2,16] x) => (float[2,8] y, float[2,8] z) {{
        a = Relu (x)
        b = Sigmoid (x)
        y = MatMul (a, w)
        z = MatMul (b, w)
    }}
    """
    model = make_model(text, {"w": _rand((16, 8), 1)})
    assert smoothable_tensors(model) == {}
    assert smoothable_tensors(model, keep_other_readers=True) == {}
    _assert_not_smoothed(model, "a", "B is shared")
    _assert_not_smoothed(model, "a", "B is shared", keep_other_readers=True)


def test_activation_is_graph_output():
    text = f"""{HEADER}
    g (float[2,16] x) => (float[2,8] y, float[2,16] n) {{
        n = Relu (x)
        y = MatMul (n, w)
    }}
    """
    model = make_model(text, {"w": _rand((16, 8), 1)})
    _assert_not_smoothed(model, "n", "graph output")
    _assert_smoothed_beside_others(model, "n", ["MatMul_1"])


def test_activation_is_graph_input():
    text = f"""{HEADER}
    g (float[2,16] x) => (float[2,8] y) {{
        y = MatMul (x, w)
    }}
    """
    model = make_model(text, {"w": _rand((16, 8), 1)})
    _assert_not_smoothed(model, "x", "graph input")
    _assert_smoothed_beside_others(model, "x", ["MatMul_0"])


@pytest.mark.parametrize("overridable", [False, True])
def test_weight_not_constant(overridable: bool):
    # B a plain graph input, or an initializer that a caller may override as an input
    text = f"""{HEADER}
    g (float[2,16] x, float[16,8] w) => (float[2,8] y) {{
        n = Relu (x)
        y = MatMul (n, w)
    }}
    """
    model = make_model(text, {"w": _rand((16, 8), 1)} if overridable else None)
    reason = "B is also a graph input" if overridable else "B is not a constant initializer"
    _assert_not_smoothed(model, "n", reason)
    _assert_not_smoothed(model, "n", reason, keep_other_readers=True)


def test_weight_3d():
    text = f"""{HEADER}
    g (float[2,4,16] x) => (float[2,4,8] y) {{
        n = Relu (x)
        y = MatMul (n, w)
    }}
    """
    model = make_model(text, {"w": _rand((2, 16, 8), 1)})
    _assert_not_smoothed(model, "n", "3-D")
    _assert_not_smoothed(model, "n", "3-D", keep_other_readers=True)


def test_reader_inside_subgraph():
    text = f"""{HEADER}
    g (bool c, float[2,16] x) => (float[2,8] y, float[2,16] z) {{
        n = Relu (x)
        y = MatMul (n, w)
        z = If (c) <
            then_branch = t () => (float[2,16] a) {{ a = Neg (n) }},
            else_branch = e () => (float[2,16] b) {{ b = Identity (n) }}
        >
    }}
    """
    model = make_model(text, {"w": _rand((16, 8), 1)})
    _assert_not_smoothed(model, "n", "inside a subgraph")
    _assert_smoothed_beside_others(model, "n", ["MatMul_1"])


def test_weight_and_activation_matmuls_share_a_tensor():
    # attention-like: n feeds a projection and an activation x activation MatMul
    text = f"""{HEADER}
    g (float[2,6,16] x) => (float[2,6,8] y, float[2,6,6] z) {{
        n = LayerNormalization <axis = -1> (x, gamma, beta)
        y = MatMul (n, w)
        t = Transpose <perm = [0, 2, 1]> (n)
        z = MatMul (n, t)
    }}
    """
    model = make_model(
        text, {"gamma": _rand((16,), 3), "beta": _rand((16,), 4), "w": _rand((16, 8), 1)}
    )
    _assert_not_smoothed(model, "n", "also read by Transpose")
    _assert_smoothed_beside_others(model, "n", ["MatMul_1"])


def test_missing_or_wrong_maxima():
    model = _mlp()
    after, report = smooth_matmuls(model, {"n": np.ones(15), "r": np.full(32, np.nan)}, 0.5)
    assert report.smoothed == {}
    assert "expected [16]" in report.skipped["n"]
    assert "not finite" in report.skipped["r"]
    assert_unchanged(model, after)
    after, report = smooth_matmuls(model, {}, 0.5)
    assert report.skipped == {
        "n": "no calibrated channel maxima",
        "r": "no calibrated channel maxima",
    }
    assert_unchanged(model, after)


def test_uniform_maxima_give_unit_scales():
    # alpha 1 and maxima of 1 everywhere: s = 1, no Mul is worth adding
    model = _mlp()
    after, report = smooth_matmuls(model, {"n": np.ones(16)}, 1.0, tensors=["n"])
    assert report.skipped == {"n": "every smoothing scale is 1"}
    assert_unchanged(model, after)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha(alpha: float):
    with pytest.raises(UsageError, match="alpha"):
        smooth_matmuls(_mlp(), {}, alpha)
