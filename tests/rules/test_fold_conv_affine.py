"""Tests for rules/fold_conv_affine.py: per-channel Mul/Add/Sub/Div folded into Conv weights."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.rules import fold_conv_affine
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

RULES = fold_conv_affine.RULES
HEADER = '<ir_version: 10, opset_import: ["" : 13]>'


def _rand(shape: tuple[int, ...], seed: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _conv(cout: int = 4, cin: int = 3, k: int = 3, group: int = 1) -> dict[str, np.ndarray]:
    return {"w": _rand((cout, cin // group, k, k), 1), "b": _rand((cout,), 2)}


def _declined(stats) -> set[str]:
    return {reason for (_, reason) in stats.declined}


# --- case 1: affine after the producer -----------------------------------------------------


@pytest.mark.parametrize(
    ("ops", "consts"),
    [
        (["Mul", "Add"], [(1, 4, 1, 1), (4, 1, 1)]),
        (["Add", "Mul"], [(4, 1, 1), ()]),
        (["Mul", "Mul"], [(), (1, 4, 1, 1)]),
        (["Div", "Sub"], [(1, 4, 1, 1), (1,)]),
    ],
)
def test_conv_then_affine_chain(ops: list[str], consts: list[tuple[int, ...]]):
    text = f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        m = {ops[0]} (c, k0)
        y = {ops[1]} (m, k1)
    }}
    """
    weights = {**_conv(), "k0": _rand(consts[0], 3, 0.5, 2.0), "k1": _rand(consts[1], 4, 0.5, 2.0)}
    model = make_model(text, weights)
    after, stats = apply(model, RULES)
    assert stats.applied["fold-affine-into-producer"] == 2
    assert_rewritten(model, after, {"Conv": 1})
    assert after.graph.node[0].output[0] == "y"


@pytest.mark.parametrize("expr", ["Sub (k, c)", "Sub (c, k)", "Mul (k, c)", "Add (k, c)"])
def test_constant_on_either_side(expr: str):
    text = f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        c = Conv (x, w, b)
        y = {expr}
    }}
    """
    text = text.replace("float[1,4,8,8] y", "float[1,4,6,6] y")
    model = make_model(text, {**_conv(), "k": _rand((4, 1, 1), 5)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})


def test_conv_transpose_grouped_scale():
    text = f"""{HEADER}
    g (float[1,4,5,5] x) => (float[1,6,11,11] y) {{
        c = ConvTranspose <group = 2, strides = [2, 2]> (x, w)
        m = Mul (c, s)
        y = Add (m, t)
    }}
    """
    weights = {
        "w": _rand((4, 3, 3, 3), 1),
        "s": _rand((1, 6, 1, 1), 2, 0.5, 2),
        "t": _rand((6, 1, 1), 3),
    }
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"ConvTranspose": 1})


def test_gemm_then_scale_and_shift():
    text = f"""{HEADER}
    g (float[4,8] a) => (float[4,5] y) {{
        c = Gemm <transB = 1, beta = 0.5> (a, w, b)
        m = Mul (c, s)
        y = Add (m, t)
    }}
    """
    weights = {
        "w": _rand((5, 8), 1),
        "b": _rand((5,), 2),
        "s": _rand((5,), 3, 0.5, 2),
        "t": _rand((1, 5), 4),
    }
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Gemm": 1})


def test_constant_nodes():
    text = f"""{HEADER}
    g (float[1,2,4,4] x) => (float[1,2,4,4] y) {{
        w = Constant <value = float[2,2,1,1] {{0.5, -1.0, 2.0, 0.25}}> ()
        s = Constant <value = float[1,2,1,1] {{3.0, -0.5}}> ()
        t = Constant <value = float {{0.75}}> ()
        c = Conv (x, w)
        m = Mul (s, c)
        y = Add (m, t)
    }}
    """
    model = make_model(text)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})


# --- case 2: affine before the Conv --------------------------------------------------------


def test_affine_into_pointwise_conv_lcnet_block():
    # PP-LCNetV3: Conv -> Mul -> Add (learnable affine) -> HardSwish -> Mul -> Add -> 1x1 Conv.
    text = f"""{HEADER.replace("13", "14")}
    g (float[1,3,8,8] x) => (float[1,6,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        m1 = Mul (s1, c)
        a1 = Add (m1, t1)
        h = HardSwish (a1)
        m2 = Mul (s2, h)
        a2 = Add (m2, t2)
        y = Conv (a2, w2, b2)
    }}
    """
    weights = {
        **_conv(),
        "s1": np.array([1.3], np.float32),
        "t1": np.array([-0.2], np.float32),
        "s2": np.array([0.8], np.float32),
        "t2": np.array([0.4], np.float32),
        "w2": _rand((6, 4, 1, 1), 7),
        "b2": _rand((6,), 8),
    }
    model = make_model(text, weights)
    after, stats = apply(model, RULES)
    assert stats.applied["fold-affine-into-producer"] == 2
    assert stats.applied["fold-affine-into-conv"] == 1
    assert_rewritten(model, after, {"Conv": 2, "HardSwish": 1})


def test_affine_into_grouped_strided_conv_without_pads():
    text = f"""{HEADER}
    g (float[1,4,9,9] x) => (float[1,6,4,4] y) {{
        m = Mul (x, s)
        a = Sub (m, t)
        y = Conv <group = 2, strides = [2, 2]> (a, w)
    }}
    """
    weights = {
        "s": _rand((1, 4, 1, 1), 1, 0.5, 2),
        "t": _rand((4, 1, 1), 2),
        "w": _rand((6, 2, 3, 3), 3),
    }
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})


def test_affine_into_two_convs():
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,3,6,6] y, float[1,5,4,4] z) {{
        m = Div (x, s)
        a = Add (m, t)
        y = Conv (a, w1)
        z = Conv <auto_pad = "VALID"> (a, w2, b2)
    }}
    """
    weights = {
        "s": _rand((4, 1, 1), 1, 0.5, 2),
        "t": np.array(0.3, np.float32),
        "w1": _rand((3, 4, 1, 1), 2),
        "w2": _rand((5, 4, 3, 3), 3),
        "b2": _rand((5,), 4),
    }
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 2})


def test_scale_only_folds_into_padded_conv():
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {{
        m = Mul (x, s)
        y = Conv <pads = [1, 1, 1, 1], group = 4> (m, w, b)
    }}
    """
    model = make_model(text, {"s": _rand((1, 4, 1, 1), 1, 0.5, 2), **_conv(4, 4, group=4)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1})


def test_padded_conv_keeps_one_shift_add():
    # Case 2b: Mul + Add before a padded depthwise Conv become Add(x, t/s) -> Conv(W*s).
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {{
        m = Mul (s, x)
        a = Add (m, t)
        y = Conv <pads = [1, 1, 1, 1], group = 4> (a, w, b)
    }}
    """
    weights = {"s": _rand((1, 4, 1, 1), 1, 0.5, 2), "t": _rand((1,), 2), **_conv(4, 4, group=4)}
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Add": 1, "Conv": 1})


def test_inside_if_branch():
    text = f"""{HEADER}
    g (bool cond, float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        y = If (cond) <
            then_branch = then_g () => (float[1,4,8,8] r) {{
                c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
                m = Mul (c, s)
                r = Add (m, t)
            }},
            else_branch = else_g () => (float[1,4,8,8] e) {{
                e = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            }}
        >
    }}
    """
    model = make_model(text, {**_conv(), "s": _rand((4, 1, 1), 3), "t": _rand((4, 1, 1), 4)})
    after, _ = apply(model, RULES)
    assert histogram(after, recurse=True) == {"If": 1, "Conv": 2}
    feeds = {"cond": np.array(True), "x": _rand((1, 3, 8, 8), 5, -2, 2)}
    assert_rewritten(model, after, {"If": 1}, feeds=feeds)


def test_producer_in_outer_scope_is_left_alone():
    text = f"""{HEADER}
    g (bool cond, float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = If (cond) <
            then_branch = then_g () => (float[1,4,8,8] r) {{
                r = Mul (c, s)
            }},
            else_branch = else_g () => (float[1,4,8,8] e) {{
                e = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            }}
        >
    }}
    """
    model = make_model(text, {**_conv(), "s": _rand((4, 1, 1), 3)})
    after, stats = apply(model, RULES)
    assert histogram(after, recurse=True) == histogram(model, recurse=True)
    assert "Conv is in another graph scope" in _declined(stats)


# --- negative cases ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "out_shape"),
    [((8,), "1,4,8,8"), ((1, 1, 4, 1, 1), "1,1,4,8,8"), ((1, 4, 8, 1), "1,4,8,8")],
)
def test_constant_not_per_channel(shape: tuple[int, ...], out_shape: str):
    # [8] runs along the last (spatial) axis; a rank-5 constant would change the output rank.
    text = f"""{HEADER}
    g (float[1,3,8,8] x) => (float[{out_shape}] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Mul (c, k)
    }}
    """
    model = make_model(text, {**_conv(), "k": _rand(shape, 3)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert any("is not per-channel" in r for r in _declined(stats))


def test_conv_output_shared():
    text = f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] z) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Mul (c, k)
        z = Relu (c)
    }}
    """
    model = make_model(text, {**_conv(), "k": _rand((4, 1, 1), 3)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Conv output has other readers or is a graph output" in _declined(stats)


def test_conv_output_is_graph_output():
    text = f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,4,8,8] c) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Mul (c, k)
    }}
    """
    model = make_model(text, {**_conv(), "k": _rand((4, 1, 1), 3)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_non_constant_weight():
    text = f"""{HEADER}
    g (float[1,3,8,8] x, float[4,3,3,3] w) => (float[1,4,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = Mul (c, k)
    }}
    """
    model = make_model(text, {"k": _rand((4, 1, 1), 3)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Conv weight is not a constant" in _declined(stats)


def test_constant_divided_by_conv_is_not_affine():
    text = f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Div (k, c)
    }}
    """
    model = make_model(text, {**_conv(), "k": _rand((4, 1, 1), 3)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_division_by_zero_constant():
    text = f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Div (c, k)
    }}
    """
    model = make_model(text, {**_conv(), "k": np.array([1, 0, 2, 3], np.float32).reshape(4, 1, 1)})
    after, stats = apply(model, RULES)
    assert histogram(after) == histogram(model)
    assert "Div by a constant with zeros" in _declined(stats)


def test_shift_into_padded_conv_stays():
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {{
        a = Add (x, t)
        y = Conv <pads = [1, 1, 1, 1]> (a, w, b)
    }}
    """
    model = make_model(text, {"t": _rand((1, 4, 1, 1), 1), **_conv(4, 4)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert any("Conv pads its input" in r for r in _declined(stats))


def test_single_channel_input_broadcast_by_constant_stays():
    # x has 1 channel; Mul by a [1,4,1,1] constant makes 4: removing it would break the Conv.
    text = f"""{HEADER}
    g (float[1,1,6,6] x) => (float[1,4,6,6] y) {{
        m = Mul (x, s)
        y = Conv (m, w, b)
    }}
    """
    model = make_model(text, {"s": _rand((1, 4, 1, 1), 1), **_conv(4, 4, k=1)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "affine input channel count unknown or broadcast by the constant" in _declined(stats)


def test_affine_output_is_graph_output():
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] a) {{
        a = Mul (x, s)
        y = Conv (a, w, b)
    }}
    """
    model = make_model(text, {"s": _rand((1, 4, 1, 1), 1), **_conv(4, 4, k=1)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)


def test_affine_read_by_non_conv():
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {{
        a = Mul (x, s)
        y = Conv (a, w, b)
        z = Relu (a)
    }}
    """
    model = make_model(text, {"s": _rand((1, 4, 1, 1), 1), **_conv(4, 4, k=1)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_chain_stops_at_shared_intermediate():
    # m is also a graph output: only the Add folds; the Mul stays.
    text = f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] m) {{
        m = Mul (x, s)
        a = Add (m, t)
        y = Conv (a, w, b)
    }}
    """
    weights = {"s": _rand((1, 4, 1, 1), 1), "t": _rand((1, 4, 1, 1), 2), **_conv(4, 4, k=1)}
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Mul": 1, "Conv": 1})


def test_custom_domain_mul():
    text = """
    <ir_version: 10, opset_import: ["" : 13, "com.example" : 1]>
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = com.example.Mul (c, k)
    }
    """
    model = make_model(text, {**_conv(), "k": _rand((4, 1, 1), 3)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_float16_dtype_is_kept():
    text = f"""{HEADER}
    g (float16[1,3,8,8] x) => (float16[1,4,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Mul (c, k)
    }}
    """
    weights = {k: v.astype(np.float16) for k, v in {**_conv(), "k": _rand((4, 1, 1), 3)}.items()}
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Conv": 1}, rtol=1e-2, atol=1e-2)
    assert {init.data_type for init in after.graph.initializer} == {10}  # float16


def test_conv1d_both_sides():
    # Rank-3 tensors: [C,1] is per channel; an affine on each side of the Conv folds.
    text = f"""{HEADER}
    g (float[2,4,10] x) => (float[2,3,10] y) {{
        m = Mul (x, s)
        a = Add (m, t)
        c = Conv (a, w, b)
        d = Div (c, k)
        y = Sub (d, u)
    }}
    """
    weights = {
        "s": _rand((4, 1), 1, 0.5, 2),
        "t": _rand((1, 4, 1), 2),
        "w": _rand((3, 4, 1), 3),
        "b": _rand((3,), 4),
        "k": _rand((3, 1), 5, 0.5, 2),
        "u": np.array([0.25], np.float32),
    }
    model = make_model(text, weights)
    after, stats = apply(model, RULES)
    assert stats.applied["fold-affine-into-producer"] == 2
    assert stats.applied["fold-affine-into-conv"] == 1
    assert_rewritten(model, after, {"Conv": 1})
