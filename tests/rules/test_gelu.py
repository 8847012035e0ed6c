"""Tests for rules/gelu.py: decomposed erf / tanh GELU -> Gelu (opset 20)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from onnxshrink.rules.gelu import RULES
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

CONSTS = """
    half = Constant<value = float {0.5}>()
    one = Constant<value = float[1] {1.0}>()
    two = Constant<value = float {2.0}>()
    sqrt2 = Constant<value = float {1.4142}>()
    isqrt2 = Constant<value = float[1] {0.70710678}>()
    c1 = Constant<value = float {0.7978845608}>()
    c3 = Constant<value = float {0.044715}>()
    three = Constant<value = float {3.0}>()
"""


def _model(body: str, opset: int = 20, extra_in: str = "", extra_out: str = "") -> onnx.ModelProto:
    # Only the constants the body reads: cleanup would drop the others and skew histograms.
    consts = "\n".join(
        line
        for line in CONSTS.splitlines()
        if line.strip() and re.search(rf"\b{line.split()[0]}\b", body)
    )
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
g (float[4,32] x{extra_in}) => (float[4,32] y{extra_out}) {{
{consts}
{body}
}}"""
    return make_model(text)


def _gelu_attrs(model: onnx.ModelProto) -> dict:
    node = next(n for n in model.graph.node if n.op_type == "Gelu")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


ERF_BODIES = {
    "torch (x*0.5) * (1+erf(x/sqrt2))": "t = Div(x, sqrt2)\n e = Erf(t)\n a = Add(e, one)\n h = Mul(x, half)\n y = Mul(h, a)",
    "x * (0.5 * (1+erf))": "t = Div(x, sqrt2)\n e = Erf(t)\n a = Add(one, e)\n h = Mul(half, a)\n y = Mul(x, h)",
    "(x * (1+erf)) * 0.5": "t = Mul(x, isqrt2)\n e = Erf(t)\n a = Add(e, one)\n m = Mul(x, a)\n y = Mul(m, half)",
    "(x * (1+erf)) / 2": "t = Mul(isqrt2, x)\n e = Erf(t)\n a = Add(e, one)\n m = Mul(a, x)\n y = Div(m, two)",
}

TANH_BODIES = {
    "torch pow": """
    p = Pow(x, three)
    q = Mul(c3, p)
    s = Add(x, q)
    u = Mul(c1, s)
    th = Tanh(u)
    a = Add(one, th)
    h = Mul(half, x)
    y = Mul(h, a)""",
    "x*x*x expanded": """
    xx = Mul(x, x)
    x3 = Mul(xx, x)
    k3 = Constant<value = float {0.0356774081}>()
    q = Mul(x3, k3)
    l = Mul(x, c1)
    u = Add(l, q)
    th = Tanh(u)
    a = Add(th, one)
    m = Mul(x, a)
    y = Mul(m, half)""",
}


@pytest.mark.parametrize("body", ERF_BODIES.values(), ids=ERF_BODIES.keys())
def test_erf_variants(body):
    before = _model(body)
    after, stats = apply(before, RULES)
    assert_rewritten(before, after, {"Gelu": 1})
    assert "approximate" not in _gelu_attrs(after)
    assert stats.applied["fuse-gelu"] == 1


@pytest.mark.parametrize("body", TANH_BODIES.values(), ids=TANH_BODIES.keys())
def test_tanh_variants(body):
    before = _model(body)
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Gelu": 1})
    assert _gelu_attrs(after)["approximate"] == b"tanh"


@pytest.mark.parametrize("opset", [17, 19])
def test_opset_below_20_declines_with_reason(opset):
    before = _model(ERF_BODIES["torch (x*0.5) * (1+erf(x/sqrt2))"], opset=opset)
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-gelu", "Gelu needs opset 20")] == 1


@pytest.mark.parametrize(
    "old, new, reason",
    [
        ("Div(x, sqrt2)", "Div(x, two)", "Erf argument is not x/sqrt(2)"),
        ("Add(e, one)", "Add(e, two)", "the constant added to Erf/Tanh is not 1"),
        ("Mul(x, half)", "Mul(x, one)", "the product's constants do not multiply to 0.5"),
    ],
)
def test_wrong_erf_constants_decline(old, new, reason):
    body = ERF_BODIES["torch (x*0.5) * (1+erf(x/sqrt2))"].replace(old, new)
    before = _model(body)
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-gelu", reason)] == 1


def test_wrong_cubic_coefficient_declines():
    body = TANH_BODIES["torch pow"].replace("Mul(c3, p)", "Mul(half, p)")
    before = _model(body)
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-gelu", "Tanh argument is not sqrt(2/pi)*(x + 0.044715*x^3)")] == 1


def test_shared_erf_output_declines():
    body = ERF_BODIES["torch (x*0.5) * (1+erf(x/sqrt2))"] + "\n z = Neg(e)"
    before = _model(body, extra_out=", float[4,32] z")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-gelu", "intermediate tensor has readers outside the pattern")] == 1


def test_graph_output_in_the_middle_declines():
    before = _model(ERF_BODIES["x * (0.5 * (1+erf))"], extra_out=", float[4,32] h")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-gelu", "intermediate tensor is a graph output")] == 1


def test_product_with_another_tensor_is_not_matched():
    body = ERF_BODIES["torch (x*0.5) * (1+erf(x/sqrt2))"].replace(
        "h = Mul(x, half)", "h = Mul(w, half)"
    )
    before = _model(body, extra_in=", float[4,32] w")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert not stats.applied and not stats.declined


def test_pattern_inside_if_branch():
    text = f"""<ir_version: 10, opset_import: ["" : 20]>
g (float[4,32] x, bool cond) => (float[4,32] y) {{
{CONSTS}
    y = If(cond) <
        then_branch = then_g () => (float[4,32] r) {{
            t = Div(x, sqrt2)
            e = Erf(t)
            a = Add(e, one)
            h = Mul(x, half)
            r = Mul(h, a)
        }},
        else_branch = else_g () => (float[4,32] o) {{
            o = Identity(x)
        }}
    >
}}"""
    before = make_model(text)
    after, stats = apply(before, RULES)
    assert stats.applied["fuse-gelu"] == 1
    ops = histogram(after, recurse=True)
    assert ops["Gelu"] == 1 and ops["Erf"] == 0
    feeds = {
        "x": np.random.default_rng(0).uniform(-4, 4, (4, 32)).astype(np.float32),
        "cond": np.array(True),
    }
    assert_rewritten(before, after, histogram(after), feeds=feeds)
