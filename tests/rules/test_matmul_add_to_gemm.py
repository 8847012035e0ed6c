"""Tests for rules/matmul_add_to_gemm.py: MatMul + Add(const) -> Gemm and Gemm + Add(const)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.rules import matmul_add_to_gemm
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

RULES = matmul_add_to_gemm.RULES
HEADER = '<ir_version: 10, opset_import: ["" : 13]>'


def _rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _declined(stats) -> set[str]:
    return {reason for (_, reason) in stats.declined}


@pytest.mark.parametrize("bias_shape", [(16,), (1, 16), (4, 1), (4, 16), ()])
def test_matmul_add_becomes_gemm(bias_shape: tuple[int, ...]):
    text = f"""{HEADER}
    g (float[4,8] a) => (float[4,16] y) {{
        m = MatMul (a, w)
        y = Add (m, c)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand(bias_shape, 2)})
    after, stats = apply(model, RULES)
    assert stats.applied["matmul-add-to-gemm"] == 1
    assert_rewritten(model, after, {"Gemm": 1})
    assert after.graph.node[0].output[0] == "y"


def test_bias_first_and_dynamic_weight():
    # Gemm takes any 2-D B; the Add's operands may come in either order.
    text = f"""{HEADER}
    g (float[4,8] a, float[8,16] w) => (float[4,16] y) {{
        m = MatMul (a, w)
        y = Add (c, m)
    }}
    """
    model = make_model(text, {"c": _rand((16,), 2)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Gemm": 1})


def test_symbolic_batch_with_row_bias():
    text = f"""{HEADER}
    g (float[N,8] a) => (float[N,16] y) {{
        m = MatMul (a, w)
        r = Add (m, c)
        y = Relu (r)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((1, 16), 2)})
    after, _ = apply(model, RULES)
    feeds = {"a": _rand((3, 8), 5)}
    assert_rewritten(model, after, {"Gemm": 1, "Relu": 1}, feeds=feeds)


@pytest.mark.parametrize(("c_init", "d_shape"), [(True, (5,)), (False, (1, 5)), (True, (3, 5))])
def test_gemm_add_folds_into_c(c_init: bool, d_shape: tuple[int, ...]):
    inputs = "(a, w, c)" if c_init else "(a, w)"
    text = f"""{HEADER}
    g (float[3,8] a) => (float[3,5] y) {{
        m = Gemm <transB = 1, alpha = 0.5, beta = 2.0> {inputs}
        y = Add (d, m)
    }}
    """
    weights = {"w": _rand((5, 8), 1), "d": _rand(d_shape, 3)}
    if c_init:
        weights["c"] = _rand((5,), 2)
    model = make_model(text, weights)
    after, stats = apply(model, RULES)
    assert stats.applied["gemm-add-fold"] == 1
    assert_rewritten(model, after, {"Gemm": 1})


def test_chain_matmul_add_add():
    text = f"""{HEADER}
    g (float[4,8] a) => (float[4,16] y) {{
        m = MatMul (a, w)
        s = Add (m, c)
        y = Add (s, d)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((16,), 2), "d": _rand((4, 1), 3)})
    after, _ = apply(model, RULES)
    assert_rewritten(model, after, {"Gemm": 1})


def test_inside_if_branch():
    text = f"""{HEADER}
    g (bool cond, float[4,8] a) => (float[4,16] y) {{
        y = If (cond) <
            then_branch = then_g () => (float[4,16] t) {{
                m = MatMul (a, w)
                t = Add (m, c)
            }},
            else_branch = else_g () => (float[4,16] e) {{
                e = MatMul (a, w)
            }}
        >
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((16,), 2)})
    after, _ = apply(model, RULES)
    assert histogram(after, recurse=True) == {"If": 1, "Gemm": 1, "MatMul": 1}
    feeds = {"cond": np.array(True), "a": _rand((4, 8), 3)}
    assert_rewritten(model, after, {"If": 1}, feeds=feeds)


# --- negative cases ------------------------------------------------------------------------


def test_batched_matmul_stays():
    text = f"""{HEADER}
    g (float[2,4,8] a) => (float[2,4,16] y) {{
        m = MatMul (a, w)
        y = Add (m, c)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((16,), 2)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "MatMul input A is not known to be 2-D (batched MatMul stays)" in _declined(stats)


@pytest.mark.parametrize(
    ("rows", "bias_shape", "out"),
    [(4, (1, 4, 16), "1,4,16"), (1, (3, 16), "3,16")],
)
def test_bias_that_does_not_broadcast_unidirectionally(rows: int, bias_shape, out: str):
    # A rank-3 bias changes the output rank; a [3,16] bias on a [1,16] product changes M.
    text = f"""{HEADER}
    g (float[{rows},8] a) => (float[{out}] y) {{
        m = MatMul (a, w)
        y = Add (m, c)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand(bias_shape, 2)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert any(r.startswith("bias") for r in _declined(stats))


def test_matmul_output_shared():
    text = f"""{HEADER}
    g (float[4,8] a) => (float[4,16] y, float[4,16] z) {{
        m = MatMul (a, w)
        y = Add (m, c)
        z = Relu (m)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((16,), 2)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "MatMul output has other readers or is a graph output" in _declined(stats)


def test_matmul_output_is_graph_output():
    text = f"""{HEADER}
    g (float[4,8] a) => (float[4,16] y, float[4,16] m) {{
        m = MatMul (a, w)
        y = Add (m, c)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((16,), 2)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_non_constant_bias():
    text = f"""{HEADER}
    g (float[4,8] a, float[16] c) => (float[4,16] y) {{
        m = MatMul (a, w)
        y = Add (m, c)
    }}
    """
    model = make_model(text, {"w": _rand((8, 16), 1)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_integer_matmul_stays():
    text = f"""{HEADER}
    g (int32[4,8] a) => (int32[4,16] y) {{
        m = MatMul (a, w)
        y = Add (m, c)
    }}
    """
    weights = {"w": np.ones((8, 16), np.int32), "c": np.arange(16, dtype=np.int32)}
    model = make_model(text, weights)
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_gemm_with_dynamic_c_stays():
    text = f"""{HEADER}
    g (float[3,8] a, float[5] c) => (float[3,5] y) {{
        m = Gemm (a, w, c)
        y = Add (m, d)
    }}
    """
    model = make_model(text, {"w": _rand((8, 5), 1), "d": _rand((5,), 2)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert "Gemm C is not a constant" in _declined(stats)


def test_custom_domain_matmul():
    text = """
    <ir_version: 10, opset_import: ["" : 13, "com.example" : 1]>
    g (float[4,8] a) => (float[4,16] y) {
        m = com.example.MatMul (a, w)
        y = Add (m, c)
    }
    """
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((16,), 2)})
    after, _ = apply(model, RULES)
    assert_unchanged(model, after)


def test_opset_6_declines():
    text = (
        HEADER.replace("13", "6")
        + """
    g (float[4,8] a) => (float[4,16] y) {
        m = MatMul (a, w)
        y = Add (m, c)
    }
    """
    )
    model = make_model(text, {"w": _rand((8, 16), 1), "c": _rand((4, 16), 2)})
    after, stats = apply(model, RULES)
    assert_unchanged(model, after)
    assert any("needs opset 7" in r for r in _declined(stats))
