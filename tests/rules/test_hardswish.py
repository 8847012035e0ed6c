"""Tests for rules/hardswish.py: decomposed HardSigmoid / HardSwish -> the standard ops."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from onnxshrink.rules.hardswish import RULES
from tests.helpers import (
    apply,
    assert_rewritten,
    assert_unchanged,
    histogram,
    make_model,
    random_feeds,
)

CONSTS = """
    three = Constant<value = float[1] {3.0}>()
    zero = Constant<value = float {0.0}>()
    six = Constant<value = float {6.0}>()
    sixth = Constant<value = float[1] {0.16666667}>()
"""


def _model(
    body: str, opset: int = 14, extra_in: str = "", extra_out: str = "", domains: str = ""
) -> onnx.ModelProto:
    # Only the constants the body reads: cleanup would drop the others and skew histograms.
    consts = "\n".join(
        line
        for line in CONSTS.splitlines()
        if line.strip() and re.search(rf"\b{line.split()[0]}\b", body)
    )
    text = f"""<ir_version: 10, opset_import: ["" : {opset}{domains}]>
g (float[2,16] x{extra_in}) => (float[2,16] y{extra_out}) {{
{consts}
{body}
}}"""
    return make_model(text)


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    # Wide enough to cover both saturated ends of the clip (x < -3 and x > 3).
    return random_feeds(model, low=-5.0, high=5.0)


def _run(model: onnx.ModelProto):
    return apply(model, RULES)


def _attrs(model: onnx.ModelProto, op: str) -> dict:
    node = next(n for n in model.graph.node if n.op_type == op)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# The four-node quad of the PP-OCRv4 models, and every other association order.
HARDSWISH_BODIES = {
    "div_of_mul (paddle2onnx)": "a = Add(x, three)\n c = Clip(a, zero, six)\n m = Mul(x, c)\n y = Div(m, six)",
    "mul_x_div": "a = Add(x, three)\n c = Clip(a, zero, six)\n h = Div(c, six)\n y = Mul(x, h)",
    "mul_x_mul_sixth": "a = Add(x, three)\n c = Clip(a, zero, six)\n h = Mul(c, sixth)\n y = Mul(x, h)",
    "mul_of_mul_sixth": "a = Add(three, x)\n c = Clip(a, zero, six)\n m = Mul(c, x)\n y = Mul(sixth, m)",
    "mul_x_sixth_first": "a = Add(x, three)\n c = Clip(a, zero, six)\n s = Mul(x, sixth)\n y = Mul(s, c)",
    "relu6_min_max": "a = Add(x, three)\n r = Max(a, zero)\n c = Min(r, six)\n m = Mul(x, c)\n y = Div(m, six)",
    "relu6_max_min": "a = Add(x, three)\n r = Min(a, six)\n c = Max(r, zero)\n h = Div(c, six)\n y = Mul(h, x)",
    "relu6_relu_min": "a = Add(x, three)\n r = Relu(a)\n c = Min(r, six)\n m = Mul(x, c)\n y = Div(m, six)",
}


@pytest.mark.parametrize("body", HARDSWISH_BODIES.values(), ids=HARDSWISH_BODIES.keys())
def test_hardswish_variants_become_hardswish_at_opset_14(body):
    before = _model(body, opset=14)
    after, stats = _run(before)
    assert_rewritten(before, after, {"HardSwish": 1}, feeds=_feeds(before))
    assert stats.applied["fuse-hard-sigmoid"] == 1


@pytest.mark.parametrize("body", HARDSWISH_BODIES.values(), ids=HARDSWISH_BODIES.keys())
def test_hardswish_variants_become_mul_hardsigmoid_below_opset_14(body):
    before = _model(body, opset=13)
    after, _ = _run(before)
    assert_rewritten(before, after, {"Mul": 1, "HardSigmoid": 1}, feeds=_feeds(before))
    hs = next(n for n in after.graph.node if n.op_type == "HardSigmoid")
    mul = next(n for n in after.graph.node if n.op_type == "Mul")
    assert hs.input[0] == "x" and set(mul.input) == {"x", hs.output[0]}
    attrs = _attrs(after, "HardSigmoid")
    assert attrs["alpha"] == pytest.approx(1 / 6, rel=1e-6) and attrs["beta"] == pytest.approx(0.5)


def test_clip_bounds_as_attributes_before_opset_11():
    before = _model(
        "a = Add(x, three)\n c = Clip<min = 0.0, max = 6.0>(a)\n m = Mul(x, c)\n y = Div(m, six)",
        opset=10,
    )
    after, _ = _run(before)
    assert_rewritten(before, after, {"Mul": 1, "HardSigmoid": 1}, feeds=_feeds(before))


def test_existing_mul_hardsigmoid_becomes_hardswish_at_opset_14():
    body = "h = HardSigmoid<alpha = 0.16666667, beta = 0.5>(x)\n y = Mul(x, h)"
    before = _model(body, opset=14)
    after, stats = _run(before)
    assert_rewritten(before, after, {"HardSwish": 1}, feeds=_feeds(before))
    assert stats.applied["fuse-hard-swish"] == 1


def test_existing_mul_hardsigmoid_stays_below_opset_14():
    body = "h = HardSigmoid<alpha = 0.16666667, beta = 0.5>(x)\n y = Mul(x, h)"
    before = _model(body, opset=13)
    after, stats = _run(before)
    assert_unchanged(before, after)
    assert not stats.applied
    assert any(
        rule == "fuse-hard-swish" and "opset 14" in reason for rule, reason in stats.declined
    )


def test_hardsigmoid_div_and_mul_forms():
    for tail in ("y = Div(c, six)", "y = Mul(c, sixth)", "y = Mul(sixth, c)"):
        before = _model(f"a = Add(x, three)\n c = Clip(a, zero, six)\n {tail}", opset=12)
        after, _ = _run(before)
        assert_rewritten(before, after, {"HardSigmoid": 1}, feeds=_feeds(before))
        attrs = _attrs(after, "HardSigmoid")
        assert attrs["alpha"] == pytest.approx(1 / 6, rel=1e-6) and attrs["beta"] == pytest.approx(
            0.5
        )


def test_general_hardsigmoid_clip_of_affine_to_unit_range():
    body = """
    a = Constant<value = float {0.2}>()
    b = Constant<value = float[1] {0.4}>()
    one = Constant<value = float {1.0}>()
    s = Mul(x, a)
    t = Add(s, b)
    y = Clip(t, zero, one)"""
    before = _model(body, opset=12)
    after, _ = _run(before)
    assert_rewritten(before, after, {"HardSigmoid": 1}, feeds=_feeds(before))
    attrs = _attrs(after, "HardSigmoid")
    assert attrs["alpha"] == pytest.approx(0.2) and attrs["beta"] == pytest.approx(0.4)


def test_gate_of_another_tensor_keeps_mul_and_is_not_hardswish():
    # y * relu6(x + 3) / 6 with y != x: a HardSigmoid gate, not a HardSwish.
    body = "a = Add(x, three)\n c = Clip(a, zero, six)\n m = Mul(g, c)\n y = Div(m, six)"
    before = _model(body, opset=14, extra_in=", float[2,16] g")
    after, _ = _run(before)
    assert_rewritten(before, after, {"Mul": 1, "HardSigmoid": 1}, feeds=_feeds(before))
    assert _attrs(after, "HardSigmoid")["beta"] == pytest.approx(0.5)


def test_other_shift_gives_hardsigmoid_with_that_beta_not_hardswish():
    body = """
    two = Constant<value = float[1] {2.0}>()
    a = Add(x, two)
    c = Clip(a, zero, six)
    m = Mul(x, c)
    y = Div(m, six)"""
    before = _model(body, opset=14)
    after, _ = _run(before)
    assert_rewritten(before, after, {"Mul": 1, "HardSigmoid": 1}, feeds=_feeds(before))
    assert _attrs(after, "HardSigmoid")["beta"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "body",
    [
        # upper bound 5 but scale 1/6: k*h != 1, not a hard sigmoid
        "five = Constant<value = float {5.0}>()\n a = Add(x, three)\n c = Clip(a, zero, five)\n m = Mul(x, c)\n y = Div(m, six)",
        # lower bound -1
        "lo = Constant<value = float {-1.0}>()\n a = Add(x, three)\n c = Clip(a, lo, six)\n m = Mul(x, c)\n y = Div(m, six)",
        # runtime clip bound
        "a = Add(x, three)\n c = Clip(a, zero, hi)\n m = Mul(x, c)\n y = Div(m, six)",
        # per-channel scale after the clip (would be a second non-constant factor with x)
        "a = Add(x, three)\n c = Clip(a, zero, six)\n m = Mul(x, c)\n y = Div(m, w)",
    ],
    ids=["upper_5", "lower_-1", "runtime_bound", "runtime_divisor"],
)
def test_non_matching_constants_leave_graph_alone(body):
    before = _model(body, opset=14, extra_in=", float hi, float[16] w")
    after, stats = _run(before)
    assert_unchanged(before, after)
    assert not stats.applied


def test_shared_clip_output_declines():
    body = (
        "a = Add(x, three)\n c = Clip(a, zero, six)\n m = Mul(x, c)\n y = Div(m, six)\n z = Neg(c)"
    )
    before = _model(body, opset=14, extra_out=", float[2,16] z")
    after, stats = _run(before)
    assert_unchanged(before, after)
    assert (
        stats.declined[("fuse-hard-sigmoid", "intermediate tensor has readers outside the pattern")]
        >= 1
    )


def test_graph_output_in_the_middle_declines():
    body = "a = Add(x, three)\n c = Clip(a, zero, six)\n m = Mul(x, c)\n y = Div(m, six)"
    before = _model(body, opset=14, extra_out=", float[2,16] m")
    after, stats = _run(before)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-hard-sigmoid", "intermediate tensor is a graph output")] >= 1


def test_shared_affine_input_stays_and_the_clip_still_fuses():
    # Add(x, 3) has another reader, so it is kept and becomes the HardSigmoid's input (beta 0).
    body = (
        "a = Add(x, three)\n c = Clip(a, zero, six)\n m = Mul(x, c)\n y = Div(m, six)\n z = Neg(a)"
    )
    before = _model(body, opset=14, extra_out=", float[2,16] z")
    after, _ = _run(before)
    assert_rewritten(
        before,
        after,
        {"Add": 1, "Neg": 1, "Mul": 1, "HardSigmoid": 1, "Constant": 1},
        feeds=_feeds(before),
    )
    attrs = _attrs(after, "HardSigmoid")
    assert attrs["alpha"] == pytest.approx(1 / 6, rel=1e-6) and attrs["beta"] == pytest.approx(0.0)


def test_custom_domain_node_is_not_matched():
    body = (
        "a = Add(x, three)\n c = Clip(a, zero, six)\n m = Mul(x, c)\n y = com.example.Div(m, six)"
    )
    before = _model(body, opset=14, domains=', "com.example" : 1')
    after, stats = _run(before)
    assert_unchanged(before, after)
    assert not stats.applied


def test_integer_input_is_not_fused():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (int32[2,16] x) => (int32[2,16] y) {
    three = Constant<value = int32 {3}>()
    zero = Constant<value = int32 {0}>()
    six = Constant<value = int32 {6}>()
    a = Add(x, three)
    c = Clip(a, zero, six)
    m = Mul(x, c)
    y = Div(m, six)
}"""
    before = make_model(text)
    after, _ = _run(before)
    assert_unchanged(before, after)


def test_pattern_inside_if_branch():
    text = """<ir_version: 10, opset_import: ["" : 12]>
g (float[2,16] x, bool cond) => (float[2,16] y) {
    three = Constant<value = float[1] {3.0}>()
    zero = Constant<value = float {0.0}>()
    six = Constant<value = float {6.0}>()
    y = If(cond) <
        then_branch = then_g () => (float[2,16] t) {
            a = Add(x, three)
            c = Clip(a, zero, six)
            m = Mul(x, c)
            t = Div(m, six)
        },
        else_branch = else_g () => (float[2,16] e) {
            e = Identity(x)
        }
    >
}"""
    before = make_model(text)
    after, stats = _run(before)
    assert stats.applied["fuse-hard-sigmoid"] == 1
    ops = histogram(after, recurse=True)
    assert ops["HardSigmoid"] == 1 and ops["Clip"] == 0 and ops["Div"] == 0 and ops["Add"] == 0
    feeds = {
        "x": np.random.default_rng(0).uniform(-5, 5, (2, 16)).astype(np.float32),
        "cond": np.array(True),
    }
    assert_rewritten(before, after, histogram(after), feeds=feeds)


def test_x_produced_by_a_scalar_mul_stays_the_input():
    # paddle's learnable affine block: x is Add(Mul(conv, s), b); the flattening of the product
    # must stop at x (it has two readers), not split it into its factors.
    body = """
    s = Constant<value = float[1] {1.5}>()
    x2 = Mul(x, s)
    a = Add(x2, three)
    c = Clip(a, zero, six)
    m = Mul(x2, c)
    y = Div(m, six)"""
    before = _model(body, opset=14)
    after, _ = _run(before)
    assert_rewritten(before, after, {"Constant": 1, "Mul": 1, "HardSwish": 1}, feeds=_feeds(before))


def test_rank_lifting_constant_declines():
    # A rank-0 input plus a shape-[1] constant gives a shape-[1] output; HardSigmoid would not.
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float x) => (float[1] y) {
    three = Constant<value = float[1] {3.0}>()
    zero = Constant<value = float {0.0}>()
    six = Constant<value = float {6.0}>()
    a = Add(x, three)
    c = Clip(a, zero, six)
    y = Div(c, six)
}"""
    before = make_model(text)
    after, stats = _run(before)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-hard-sigmoid", "a constant has a higher rank than the input")] >= 1
