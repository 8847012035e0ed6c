"""Tests for rules/layernorm.py: decomposed layer normalization -> LayerNormalization."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from onnxshrink.rules.layernorm import RULES
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

RNG = np.random.default_rng(0)
GAMMA = RNG.uniform(0.5, 1.5, 16).astype(np.float32)
BETA = RNG.uniform(-0.5, 0.5, 16).astype(np.float32)

HEAD = """
    two = Constant<value = float {2.0}>()
    eps = Constant<value = float {1e-5}>()
"""


def _reduce(name: str, src: str, opset: int, axes: str = "-1") -> str:
    """A ReduceMean line: axes as an attribute before opset 18, as an input from 18."""
    if opset >= 18:
        return f"{name}_axes = Constant<value = int64[{len(axes.split(','))}] {{{axes}}}>()\n    {name} = ReduceMean({src}, {name}_axes)"
    return f"{name} = ReduceMean<axes = [{axes}]>({src})"


def _core(
    opset: int,
    out: str = "n",
    axes: str = "-1",
    square: str = "Pow(d, two)",
    norm: str = "Div(d, std)",
) -> str:
    return f"""
    {_reduce("mean", "x", opset, axes)}
    d = Sub(x, mean)
    sq = {square}
    {_reduce("var", "sq", opset, axes)}
    ve = Add(var, eps)
    std = Sqrt(ve)
    {out} = {norm}
"""


def _model(
    body: str,
    opset: int = 17,
    shape: str = "[2,5,16]",
    extra_in: str = "",
    extra_out: str = "",
    inits=None,
):
    # Only the constants the body reads: cleanup would drop the others and skew histograms.
    head = "\n".join(
        line
        for line in HEAD.splitlines()
        if line.strip() and re.search(rf"\b{line.split()[0]}\b", body)
    )
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
g (float{shape} x{extra_in}) => (float{shape} y{extra_out}) {{
{head}
{body}
}}"""
    return make_model(text, inits)


def _ln_attrs(model: onnx.ModelProto) -> dict:
    node = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} | {
        "inputs": len(node.input)
    }


AFFINE = {"gamma": GAMMA, "beta": BETA}


@pytest.mark.parametrize("opset", [17, 18])
def test_full_pattern_with_gamma_and_beta(opset):
    body = _core(opset) + "    s = Mul(n, gamma)\n    y = Add(s, beta)"
    before = _model(body, opset, inits=AFFINE)
    after, stats = apply(before, RULES)
    assert_rewritten(before, after, {"LayerNormalization": 1})
    attrs = _ln_attrs(after)
    assert attrs["axis"] == -1 and attrs["epsilon"] == pytest.approx(1e-5) and attrs["inputs"] == 3
    assert stats.applied["fuse-layernorm"] == 1


@pytest.mark.parametrize(
    "square, norm, tail",
    [
        ("Mul(d, d)", "Div(d, std)", "y = Mul(gamma, n)"),  # square as Mul, gamma first, no beta
        ("Pow(d, two)", "Mul(d, r)", "y = Add(beta, n)"),  # Reciprocal, beta without gamma
        ("Pow(d, two)", "Mul(r, d)", "y = Identity(n)"),  # neither gamma nor beta
    ],
    ids=["mul_square_gamma_only", "reciprocal_beta_only", "bare"],
)
def test_variants(square, norm, tail):
    body = _core(17, square=square, norm=norm) + f"    {tail}"
    if "r," in norm or ", r" in norm:
        body = body.replace("std = Sqrt(ve)", "std = Sqrt(ve)\n    r = Reciprocal(std)")
    before = _model(body, inits=AFFINE)
    after, _ = apply(before, RULES)
    expected = {"LayerNormalization": 1} | ({"Identity": 1} if "Identity" in tail else {})
    assert_rewritten(before, after, expected)
    assert _ln_attrs(after)["inputs"] == (3 if "beta" in tail else 2)


def test_sqrt_as_pow_half_and_eps_first():
    body = (
        _core(17)
        .replace("ve = Add(var, eps)", "ve = Add(eps, var)")
        .replace(
            "std = Sqrt(ve)", "half = Constant<value = float[1] {0.5}>()\n    std = Pow(ve, half)"
        )
    )
    before = _model(body + "    y = Identity(n)")
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"LayerNormalization": 1, "Identity": 1})


def test_two_trailing_axes_with_matrix_gamma():
    gamma = RNG.uniform(0.5, 1.5, (5, 16)).astype(np.float32)
    body = _core(17, axes="-2, -1") + "    y = Mul(n, gamma)"
    before = _model(body, inits={"gamma": gamma})
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"LayerNormalization": 1})
    assert _ln_attrs(after)["axis"] == -2


def test_positive_last_axis_and_broadcast_gamma():
    body = _core(17, axes="2") + "    y = Mul(n, gamma)"
    before = _model(body, inits={"gamma": GAMMA.reshape(1, 1, 16)})
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"LayerNormalization": 1})


@pytest.mark.parametrize("opset", [12, 14, 16])
def test_opset_below_17_declines_with_reason(opset):
    body = _core(opset) + "    s = Mul(n, gamma)\n    y = Add(s, beta)"
    before = _model(body, opset, inits=AFFINE)
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-layernorm", "LayerNormalization needs opset 17")] >= 1


def test_middle_axis_declines():
    before = _model(_core(17, axes="1") + "    y = Identity(n)")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-layernorm", "ReduceMean axes are not the trailing axes")] >= 1


def test_different_axes_decline():
    body = _core(17).replace(
        "var = ReduceMean<axes = [-1]>(sq)", "var = ReduceMean<axes = [-2, -1]>(sq)"
    )
    before = _model(body + "    y = Identity(n)")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-layernorm", "the two ReduceMeans reduce different axes")] >= 1


def test_keepdims_zero_declines():
    # var keeps no dims: Div broadcasts std along the wrong axis; a valid graph, not a LayerNorm.
    body = _core(17).replace(
        "var = ReduceMean<axes = [-1]>(sq)", "var = ReduceMean<axes = [-1], keepdims = 0>(sq)"
    )
    before = _model(body + "    y = Identity(n)", shape="[16,16,16]")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-layernorm", "ReduceMean keepdims is not 1")] >= 1


def test_wrong_exponent_declines():
    body = _core(17).replace("Pow(d, two)", "Pow(d, three)")
    before = _model("    three = Constant<value = float {3.0}>()\n" + body + "    y = Identity(n)")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-layernorm", "square exponent is not 2")] >= 1


def test_runtime_eps_declines():
    body = _core(17).replace("Add(var, eps)", "Add(var, e)")
    before = _model(body + "    y = Identity(n)", extra_in=", float e")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-layernorm", "epsilon is not a scalar constant")] >= 1


def test_shared_centered_tensor_declines():
    body = _core(17) + "    y = Identity(n)\n    z = Neg(d)"
    before = _model(body, extra_out=", float[2,5,16] z")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert (
        stats.declined[("fuse-layernorm", "intermediate tensor has readers outside the pattern")]
        >= 1
    )


def test_graph_output_in_the_middle_declines():
    body = _core(17) + "    y = Identity(n)"
    before = _model(body, extra_out=", float[2,5,1] var")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert stats.declined[("fuse-layernorm", "intermediate tensor is a graph output")] >= 1


def test_non_constant_gamma_is_left_as_a_mul():
    body = _core(17) + "    s = Mul(n, g)\n    y = Add(s, beta)"
    before = _model(body, extra_in=", float[16] g", inits={"beta": BETA})
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"LayerNormalization": 1, "Mul": 1, "Add": 1})
    assert _ln_attrs(after)["inputs"] == 2


def test_gamma_varying_along_other_axes_is_not_absorbed():
    gamma = RNG.uniform(0.5, 1.5, (5, 1)).astype(np.float32)
    before = _model(_core(17) + "    y = Mul(n, gamma)", inits={"gamma": gamma})
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"LayerNormalization": 1, "Mul": 1})


def test_sub_of_another_tensor_is_not_matched():
    body = _core(17).replace("d = Sub(x, mean)", "d = Sub(w, mean)")
    before = _model(body + "    y = Identity(n)", extra_in=", float[2,5,16] w")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert not stats.applied


def test_dynamic_normalized_dim_declines():
    before = _model(_core(17) + "    y = Identity(n)", shape="[2,5,N]")
    after, stats = apply(before, RULES)
    assert_unchanged(before, after)
    assert any("not static" in reason for _, reason in stats.declined)


def test_pattern_inside_if_branch():
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
g (float[2,5,16] x, bool cond) => (float[2,5,16] y) {{
{HEAD}
    y = If(cond) <
        then_branch = then_g () => (float[2,5,16] t) {{
{_core(17)}
            s = Mul(n, gamma)
            t = Add(s, beta)
        }},
        else_branch = else_g () => (float[2,5,16] e) {{
            e = Identity(x)
        }}
    >
}}"""
    before = make_model(text, AFFINE)
    after, stats = apply(before, RULES)
    assert stats.applied["fuse-layernorm"] == 1
    ops = histogram(after, recurse=True)
    assert ops["LayerNormalization"] == 1 and ops["ReduceMean"] == 0 and ops["Sqrt"] == 0
    feeds = {"x": RNG.standard_normal((2, 5, 16)).astype(np.float32), "cond": np.array(True)}
    assert_rewritten(before, after, histogram(after), feeds=feeds)


def test_same_axis_spelled_two_ways():
    body = _core(17).replace(
        "var = ReduceMean<axes = [-1]>(sq)", "var = ReduceMean<axes = [2]>(sq)"
    )
    before = _model(body + "    y = Identity(n)")
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"LayerNormalization": 1, "Identity": 1})
