"""Tests for rules/fold_batchnorm.py: BN folding into Conv, ConvTranspose, Gemm and 2-D MatMul."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.rules import fold_batchnorm
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

RULES = fold_batchnorm.RULES


def _bn_params(c: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.normal(0, 0.5, c).astype(np.float32),
        "mean": rng.normal(0, 0.5, c).astype(np.float32),
        "var": rng.uniform(0.2, 2.0, c).astype(np.float32),
    }


def _conv_params(
    cout: int, cin: int, k: int = 3, bias: bool = True, seed: int = 2
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(0, 0.3, (cout, cin, k, k)).astype(np.float32)}
    if bias:
        params["b"] = rng.normal(0, 0.3, cout).astype(np.float32)
    return params


def _declined(stats, rule: str = "fold-batchnorm") -> set[str]:
    return {reason for (name, reason) in stats.declined if name == rule}


CONV_BN = """
<ir_version: 10, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
}
"""


def test_conv_bn_folds_into_conv():
    model = make_model(CONV_BN, {**_conv_params(4, 3), **_bn_params(4)})
    after, stats = apply(model, RULES)
    assert stats.applied["fold-batchnorm"] == 1
    assert_rewritten(model, after, {"Conv": 1})


def test_conv_without_bias_gets_one():
    text = CONV_BN.replace("(x, w, b)", "(x, w)")
    model = make_model(text, {**_conv_params(4, 3, bias=False), **_bn_params(4)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})
    assert len(after.graph.node[0].input) == 3


def test_constant_node_weights():
    text = """
    <ir_version: 10, opset_import: ["" : 11]>
    g (float[1,2,5,5] x) => (float[1,2,3,3] y) {
        w = Constant <value = float[2,2,3,3] {
            0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9,
            0.3, 0.1, 0.2, 0.5, 0.4, 0.6, 0.8, 0.7, 0.9, -0.3, -0.1, -0.2, -0.5, -0.4, -0.6, -0.8, -0.7, -0.9}> ()
        gamma = Constant <value = float[2] {1.5, 0.5}> ()
        beta = Constant <value = float[2] {0.1, -0.2}> ()
        mean = Constant <value = float[2] {0.3, -0.4}> ()
        var = Constant <value = float[2] {0.8, 1.7}> ()
        c = Conv (x, w)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    model = make_model(text)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})


def test_bn_output_is_graph_output_keeps_name():
    # y is the graph output: the Conv must now write `y` itself.
    model = make_model(CONV_BN, {**_conv_params(4, 3), **_bn_params(4)})
    after, _ = apply(model, RULES)
    assert after.graph.node[0].output[0] == "y"


def test_conv_transpose_with_groups():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,4,5,5] x) => (float[1,6,11,11] y) {
        c = ConvTranspose <group = 2, strides = [2, 2]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    rng = np.random.default_rng(3)
    weights = {
        "w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),  # [Cin, Cout/group, k, k]
        "b": rng.normal(0, 0.3, 6).astype(np.float32),
    }
    model = make_model(text, {**weights, **_bn_params(6)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"ConvTranspose": 1})


def test_gemm_with_trans_b_alpha_beta():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[4,8] a) => (float[4,5] y) {
        c = Gemm <transB = 1, alpha = 0.7, beta = 1.3> (a, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    rng = np.random.default_rng(4)
    weights = {
        "w": rng.normal(0, 0.3, (5, 8)).astype(np.float32),
        "b": rng.normal(0, 0.3, (1, 5)).astype(np.float32),
    }
    model = make_model(text, {**weights, **_bn_params(5)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Gemm": 1})


def test_matmul_2d_becomes_gemm():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[4,8] a) => (float[4,5] y) {
        c = MatMul (a, w)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    weights = {"w": np.random.default_rng(5).normal(0, 0.3, (8, 5)).astype(np.float32)}
    model = make_model(text, {**weights, **_bn_params(5)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Gemm": 1})


def test_inside_if_branch():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (bool cond, float[1,3,8,8] x) => (float[1,4,8,8] y) {
        y = If (cond) <
            then_branch = then_g () => (float[1,4,8,8] t) {
                c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
                t = BatchNormalization (c, gamma, beta, mean, var)
            },
            else_branch = else_g () => (float[1,4,8,8] e) {
                e = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            }
        >
    }
    """
    model = make_model(text, {**_conv_params(4, 3), **_bn_params(4)})
    after, stats = apply(model, RULES)
    assert stats.applied["fold-batchnorm"] == 1
    assert histogram(after, recurse=True) == {"If": 1, "Conv": 2}
    feeds = {
        "cond": np.array(True),
        "x": np.random.default_rng(0).uniform(-2, 2, (1, 3, 8, 8)).astype(np.float32),
    }
    assert_rewritten(model, after, {"If": 1}, feeds=feeds)


# --- negative cases ------------------------------------------------------------------------


def test_standalone_bn_stays_with_reason():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
        r = Relu (x)
        y = BatchNormalization (r, gamma, beta, mean, var)
    }
    """
    model = make_model(text, _bn_params(4))
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "standalone BatchNormalization: input comes from Relu" in _declined(stats)


def test_bn_on_graph_input_stays():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
        y = BatchNormalization (x, gamma, beta, mean, var)
    }
    """
    model = make_model(text, _bn_params(4))
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert any("graph input" in r for r in _declined(stats))


def test_non_constant_bn_params():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x, float[4] gamma) => (float[1,4,8,8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    params = _bn_params(4)
    del params["gamma"]
    model = make_model(text, {**_conv_params(4, 3), **params})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "BatchNormalization parameters are not constant" in _declined(stats)


def test_non_constant_conv_weight():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x, float[4,3,3,3] w) => (float[1,4,8,8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    model = make_model(text, _bn_params(4))
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Conv weight is not a constant" in _declined(stats)


def test_conv_output_shared():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] z) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
        z = Relu (c)
    }
    """
    model = make_model(text, {**_conv_params(4, 3), **_bn_params(4)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Conv output has other readers or is a graph output" in _declined(stats)


def test_conv_output_is_graph_output():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] c) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    model = make_model(text, {**_conv_params(4, 3), **_bn_params(4)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_training_mode_stays():
    text = """
    <ir_version: 10, opset_import: ["" : 15]>
    g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y, running_mean, running_var = BatchNormalization <training_mode = 1> (c, gamma, beta, mean, var)
    }
    """
    model = make_model(text, {**_conv_params(4, 3), **_bn_params(4)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "BatchNormalization is in training mode" in _declined(stats)


def test_custom_domain_producer():
    text = """
    <ir_version: 10, opset_import: ["" : 13, "com.example" : 1]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c = com.example.Conv (x, w, b)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    model = make_model(text, {**_conv_params(4, 3), **_bn_params(4)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_batched_matmul_stays():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[2,4,8] a) => (float[2,4,5] y) {
        c = MatMul (a, w)
        y = BatchNormalization (c, gamma, beta, mean, var)
    }
    """
    # BN's channel axis 1 has 4 entries here; the weight's output axis has 5.
    weights = {"w": np.random.default_rng(5).normal(0, 0.3, (8, 5)).astype(np.float32)}
    model = make_model(text, {**weights, **_bn_params(4)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "MatMul input A is not known to be 2-D" in _declined(stats)


@pytest.mark.parametrize("opset", [9, 11])
def test_older_opsets(opset: int):
    text = CONV_BN.replace('"" : 13', f'"" : {opset}')
    model = make_model(text, {**_conv_params(4, 3), **_bn_params(4)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})
