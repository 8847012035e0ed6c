"""Tests for rules/pad_conv.py: a zero constant Pad merged into the Conv's pads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.rules import pad_conv
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

RULES = pad_conv.RULES


def _rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _weights(**extra: np.ndarray) -> dict[str, np.ndarray]:
    return {"w": _rand((4, 3, 3, 3), 1), "b": _rand((4,), 2), **extra}


def _declined(stats) -> set[str]:
    return {reason for (_, reason) in stats.declined}


def _conv_pads(model: onnx.ModelProto) -> list[int]:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return next((list(a.ints) for a in conv.attribute if a.name == "pads"), [])


def test_pad_input_form_opset_13():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,9,11] y) {
        p = Pad (x, pads)
        y = Conv <pads = [1, 0, 0, 1]> (p, w, b)
    }
    """
    pads = np.array([0, 0, 1, 2, 0, 0, 1, 2], np.int64)  # H: 1+1, W: 2+2
    model = make_model(text, _weights(pads=pads))
    after, stats = apply(model, RULES)
    assert stats.applied["pad-into-conv"] == 1
    assert_rewritten(model, after, {"Conv": 1})
    assert _conv_pads(after) == [2, 2, 1, 3]


def test_pad_attribute_form_opset_10():
    text = """
    <ir_version: 10, opset_import: ["" : 10]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        p = Pad <pads = [0, 0, 1, 1, 0, 0, 1, 1], mode = "constant", value = 0.0> (x)
        y = Conv (p, w, b)
    }
    """
    model = make_model(text, _weights())
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})
    assert _conv_pads(after) == [1, 1, 1, 1]


def test_explicit_zero_value_and_valid_auto_pad():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        p = Pad <mode = "constant"> (x, pads, zero)
        y = Conv <auto_pad = "VALID"> (p, w, b)
    }
    """
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    model = make_model(text, _weights(pads=pads, zero=np.array(0.0, np.float32)))
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})


def test_pad_with_axes_opset_18():
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[1,3,8,8] x) => (float[1,4,7,8] y) {
        p = Pad (x, pads, , axes)
        y = Conv (p, w, b)
    }
    """
    weights = _weights(pads=np.array([0, 1, 1, 1], np.int64), axes=np.array([-2, -1], np.int64))
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})
    assert _conv_pads(after) == [0, 1, 1, 1]


def test_constant_node_pads():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        pads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()
        p = Pad (x, pads)
        y = Conv (p, w, b)
    }
    """
    model = make_model(text, _weights())
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})


def test_inside_if_branch():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (bool cond, float[1,3,8,8] x) => (float[1,4,8,8] y) {
        y = If (cond) <
            then_branch = then_g () => (float[1,4,8,8] t) {
                p = Pad (x, pads)
                t = Conv (p, w, b)
            },
            else_branch = else_g () => (float[1,4,8,8] e) {
                e = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            }
        >
    }
    """
    model = make_model(text, _weights(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    after, _ = apply(model, RULES)
    assert histogram(after, recurse=True) == {"If": 1, "Conv": 2}
    feeds = {"cond": np.array(True), "x": _rand((1, 3, 8, 8), 3)}
    assert_rewritten(model, after, {"If": 1}, feeds=feeds)


# --- negative cases ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "pads", "reason"),
    [
        ('<mode = "reflect">', [0, 0, 1, 1, 0, 0, 1, 1], "Pad mode is reflect"),
        ('<mode = "edge">', [0, 0, 1, 1, 0, 0, 1, 1], "Pad mode is edge"),
        ("", [0, 1, 1, 1, 0, 0, 1, 1], "Pad pads the batch or channel axis"),
        ("", [0, 0, -1, 1, 0, 0, 1, 1], "Pad crops (negative pads)"),
    ],
)
def test_pad_that_conv_cannot_express(attrs: str, pads: list[int], reason: str):
    channels = 3 + pads[1] + pads[5]
    height = 8 + pads[2] + pads[6] - 2
    text = f"""
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,{height},8] y) {{
        p = Pad {attrs} (x, pads)
        y = Conv (p, w, b)
    }}
    """
    weights = _weights(pads=np.array(pads, np.int64))
    weights["w"] = _rand((4, channels, 3, 3), 1)
    model = make_model(text, weights)
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert reason in _declined(stats)


def test_nonzero_pad_value():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        p = Pad (x, pads, value)
        y = Conv (p, w, b)
    }
    """
    weights = _weights(
        pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), value=np.array(0.5, np.float32)
    )
    model = make_model(text, weights)
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Pad constant_value is not 0" in _declined(stats)


def test_non_constant_pads():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x, int64[8] pads) => (float[1,4,?,?] y) {
        p = Pad (x, pads)
        y = Conv (p, w, b)
    }
    """
    model = make_model(text, _weights())
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Pad pads are not a constant" in _declined(stats)


def test_pad_read_by_two_nodes():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,3,10,10] z) {
        p = Pad (x, pads)
        y = Conv (p, w, b)
        z = Relu (p)
    }
    """
    model = make_model(text, _weights(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Pad output has other readers or is a graph output" in _declined(stats)


def test_pad_output_is_graph_output():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,3,10,10] p) {
        p = Pad (x, pads)
        y = Conv (p, w, b)
    }
    """
    model = make_model(text, _weights(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_conv_same_auto_pad():
    text = """
    <ir_version: 10, opset_import: ["" : 13]>
    g (float[1,3,8,8] x) => (float[1,4,10,10] y) {
        p = Pad (x, pads)
        y = Conv <auto_pad = "SAME_UPPER"> (p, w, b)
    }
    """
    model = make_model(text, _weights(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Conv auto_pad is SAME_UPPER" in _declined(stats)


def test_custom_domain_pad():
    text = """
    <ir_version: 10, opset_import: ["" : 13, "com.example" : 1]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        p = com.example.Pad (x, pads)
        y = Conv (p, w, b)
    }
    """
    model = make_model(text, _weights(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)
