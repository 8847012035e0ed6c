"""Tests for rules/merge_reshapes.py: chains of layout ops become one op (or none)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.rules import merge_reshapes, noop_elimination
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

RULES = merge_reshapes.RULES
WITH_NOOPS = [*noop_elimination.RULES, *merge_reshapes.RULES]


def _model(
    body: str, x: str, y: str, opset: int = 14, outputs: str = "", **inits
) -> onnx.ModelProto:
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
g ({x} x) => ({y} y{outputs}) {{
    a = Relu(x)
{body}
    y = Sigmoid(b)
}}"""
    return make_model(text, inits)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _attr(model: onnx.ModelProto, op: str, name: str):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _const(model: onnx.ModelProto, op: str, index: int = 1) -> list[int]:
    node = next(n for n in model.graph.node if n.op_type == op)
    init = next(i for i in model.graph.initializer if i.name == node.input[index])
    return onnx.numpy_helper.to_array(init).tolist()


# --- case 1: Transpose -> Transpose -------------------------------------------------------


def test_two_transposes_compose_into_one():
    before = _model(
        "c = Transpose<perm = [0, 2, 1, 3]>(a)\n b = Transpose<perm = [0, 2, 3, 1]>(c)",
        "float[1,2,3,4]",
        "float[1,2,4,3]",
    )
    after, stats = apply(before, RULES)
    assert stats.applied["compose-transposes"] == 1
    assert_rewritten(before, after, {"Relu": 1, "Transpose": 1, "Sigmoid": 1})
    assert _attr(after, "Transpose", "perm") == [0, 1, 3, 2]


def test_inverse_transposes_vanish_with_the_noop_rule():
    before = _model(
        "c = Transpose<perm = [0, 2, 3, 1]>(a)\n b = Transpose<perm = [0, 3, 1, 2]>(c)",
        "float[1,2,3,4]",
        "float[1,2,3,4]",
    )
    after, _ = apply(before, WITH_NOOPS)
    assert_rewritten(before, after, {"Relu": 1, "Sigmoid": 1})


def test_shared_first_transpose_is_kept():
    before = _model(
        "c = Transpose<perm = [0, 2, 1, 3]>(a)\n b = Transpose<perm = [0, 2, 3, 1]>(c)",
        "float[1,2,3,4]",
        "float[1,2,4,3]",
        outputs=", float[1,3,2,4] c",
    )
    after, stats = apply(before, RULES)
    assert stats.declined[("compose-transposes", "first Transpose has other readers")] == 1
    assert_unchanged(before, after)


def test_shared_inverse_transposes_still_bypass_the_second():
    before = make_model("""<ir_version: 10, opset_import: ["" : 14]>
g (float[1,2,3,4] x) => (float[1,2,3,4] y, float[1,3,4,2] z) {
    a = Relu(x)
    c = Transpose<perm = [0, 2, 3, 1]>(a)
    b = Transpose<perm = [0, 3, 1, 2]>(c)
    y = Sigmoid(b)
    z = Neg(c)
}""")
    after, _ = apply(before, WITH_NOOPS)
    assert_rewritten(before, after, {"Relu": 1, "Transpose": 1, "Sigmoid": 1, "Neg": 1})


# --- case 2: Reshape of a reshape-like op -------------------------------------------------


def test_reshape_of_reshape_collapses():
    before = _model(
        "c = Reshape(a, s1)\n b = Reshape(c, s2)",
        "float[2,3,4]",
        "float[4,6]",
        s1=_i64(6, 4),
        s2=_i64(4, -1),
    )
    after, stats = apply(before, RULES)
    assert stats.applied["collapse-reshapes"] == 1
    assert_rewritten(before, after, {"Relu": 1, "Reshape": 1, "Sigmoid": 1})


def test_reshape_copy_of_static_inner_dim_is_resolved():
    before = _model(
        "c = Reshape(a, s1)\n b = Reshape(c, s2)",
        "float[2,3,4]",
        "float[6,2,2]",
        s1=_i64(6, 4),
        s2=_i64(0, 2, 2),
    )
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Relu": 1, "Reshape": 1, "Sigmoid": 1})
    assert _const(after, "Reshape") == [6, 2, 2]


def test_reshape_copy_of_dynamic_inner_dim_is_kept():
    before = _model(
        "c = Reshape(a, s1)\n b = Reshape(c, s2)",
        "float[N,3,4]",
        "float[M,4]",
        s1=_i64(-1, 4),
        s2=_i64(0, 4),
    )
    after, stats = apply(before, RULES)
    assert (
        stats.declined[("collapse-reshapes", "shape copies a dynamic dim of the inner output")] == 1
    )
    assert histogram(after)["Reshape"] == 2


def test_reshape_of_squeeze_and_flatten_collapse():
    before = _model(
        "c = Squeeze(a, ax)\n d = Flatten<axis = 1>(c)\n b = Reshape(d, s)",
        "float[2,1,3,4]",
        "float[4,6]",
        ax=_i64(1),
        s=_i64(4, 6),
    )
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Relu": 1, "Reshape": 1, "Sigmoid": 1})


def test_reshape_with_graph_output_in_the_middle_is_kept():
    before = _model(
        "c = Reshape(a, s1)\n b = Reshape(c, s2)",
        "float[2,3,4]",
        "float[4,6]",
        outputs=", float[6,4] c",
        s1=_i64(6, 4),
        s2=_i64(4, 6),
    )
    after, stats = apply(before, RULES)
    assert stats.declined[("collapse-reshapes", "inner op has other readers")] == 1
    assert_unchanged(before, after)


def test_reshape_with_computed_shape_is_kept():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3,4] x, int64[2] s) => (float[?,?] y) {
    a = Relu(x)
    c = Reshape(a, t)
    b = Reshape(c, s)
    y = Sigmoid(b)
}"""
    before = make_model(text, {"t": _i64(6, 4)})
    after, stats = apply(before, RULES)
    assert (
        stats.declined[("collapse-reshapes", "computed shape may copy dims of the inner output")]
        == 1
    )
    assert histogram(after)["Reshape"] == 2


# --- case 3: Squeeze / Unsqueeze pairs ----------------------------------------------------

PAIRS = {
    "unsqueeze_squeeze_cancel_13": (
        "c = Unsqueeze(a, ax)\n b = Squeeze(c, ax)",
        "float[2,3]",
        "float[2,3]",
        13,
        {"Relu": 1, "Sigmoid": 1},
    ),
    "squeeze_unsqueeze_cancel_13": (
        "c = Squeeze(a, ax)\n b = Unsqueeze(c, ax)",
        "float[2,1,3]",
        "float[2,1,3]",
        13,
        {"Relu": 1, "Sigmoid": 1},
    ),
    "unsqueeze_unsqueeze_merge_13": (
        "c = Unsqueeze(a, ax)\n b = Unsqueeze(c, ax2)",
        "float[2,3]",
        "float[2,1,3,1]",
        13,
        {"Relu": 1, "Unsqueeze": 1, "Sigmoid": 1},
    ),
    "squeeze_squeeze_merge_13": (
        "c = Squeeze(a, ax)\n b = Squeeze(c, ax2)",
        "float[2,1,3,1]",
        "float[2,3]",
        13,
        {"Relu": 1, "Squeeze": 1, "Sigmoid": 1},
    ),
    "squeeze_then_unsqueeze_elsewhere_13": (
        "c = Squeeze(a, ax)\n b = Unsqueeze(c, ax2)",
        "float[2,1,3]",
        "float[2,3,1]",
        13,
        {"Relu": 1, "Reshape": 1, "Sigmoid": 1},
    ),
}
PAIR_AXES = {"ax": _i64(1), "ax2": _i64(-1)}


@pytest.mark.parametrize("case", PAIRS.values(), ids=PAIRS.keys())
def test_squeeze_unsqueeze_pairs(case):
    body, x, y, opset, ops = case
    axes = {name: value for name, value in PAIR_AXES.items() if name in body}
    before = _model(body, x, y, opset, **axes)
    after, stats = apply(before, WITH_NOOPS)
    assert stats.applied["merge-squeeze-unsqueeze"] == 1
    assert_rewritten(before, after, ops)


def test_unsqueeze_merge_axes_are_in_input_terms():
    before = _model(
        "c = Unsqueeze(a, ax)\n b = Unsqueeze(c, ax2)",
        "float[2,3]",
        "float[1,2,1,3]",
        13,
        ax=_i64(0),
        ax2=_i64(2),
    )
    after, _ = apply(before, RULES)
    assert _const(after, "Unsqueeze") == [0, 2]


def test_attribute_axes_before_opset_13():
    before = _model(
        "c = Unsqueeze<axes = [0]>(a)\n b = Unsqueeze<axes = [3]>(c)",
        "float[2,3]",
        "float[1,2,3,1]",
        opset=11,
    )
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Relu": 1, "Unsqueeze": 1, "Sigmoid": 1})
    assert _attr(after, "Unsqueeze", "axes") == [0, 3]


def test_squeeze_cancel_with_attribute_axes_before_opset_13():
    before = _model(
        "c = Squeeze<axes = [1]>(a)\n b = Unsqueeze<axes = [1]>(c)",
        "float[2,1,3]",
        "float[2,1,3]",
        opset=11,
    )
    after, _ = apply(before, WITH_NOOPS)
    assert_rewritten(before, after, {"Relu": 1, "Sigmoid": 1})


def test_shared_first_squeeze_is_kept_unless_it_cancels():
    before = _model(
        "c = Unsqueeze(a, ax)\n b = Unsqueeze(c, ax2)",
        "float[2,3]",
        "float[1,2,1,3]",
        13,
        outputs=", float[1,2,3] c",
        ax=_i64(0),
        ax2=_i64(2),
    )
    after, stats = apply(before, RULES)
    assert stats.declined[("merge-squeeze-unsqueeze", "first op has other readers")] == 1
    assert_unchanged(before, after)


def test_cancelling_pair_from_graph_input_to_graph_output_leaves_one_identity():
    text = """<ir_version: 10, opset_import: ["" : 13]>
g (float[2,3] x) => (float[2,3] y) {
    c = Unsqueeze(x, ax)
    y = Squeeze(c, ax)
}"""
    before = make_model(text, {"ax": _i64(0)})
    after, _ = apply(before, WITH_NOOPS)
    assert_rewritten(before, after, {"Identity": 1})


# --- case 4: chains into one Reshape ------------------------------------------------------


def test_flatten_of_reshape_becomes_one_reshape():
    before = _model(
        "c = Reshape(a, s)\n b = Flatten<axis = 1>(c)",
        "float[2,3,4]",
        "float[2,12]",
        s=_i64(2, 12, 1),
    )
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Relu": 1, "Reshape": 1, "Sigmoid": 1})
    assert _const(after, "Reshape") == [2, 12]


def test_unsqueeze_of_reshape_with_dynamic_batch_copies_it():
    before = _model(
        "c = Reshape(a, s)\n b = Unsqueeze(c, ax)",
        "float[N,3,4]",
        "float[N,12,1]",
        s=_i64(0, 12),
        ax=_i64(2),
    )
    after, _ = apply(before, RULES)
    feeds = {"x": np.random.default_rng(0).normal(size=(5, 3, 4)).astype(np.float32)}
    assert_rewritten(before, after, {"Relu": 1, "Reshape": 1, "Sigmoid": 1}, feeds=feeds)
    assert _const(after, "Reshape") == [0, 12, 1]


# --- subgraphs and domains ----------------------------------------------------------------


def test_pair_inside_if_branch_is_merged():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[1,2,3,4] x) => (float[1,2,4,3] y) {
    a = Relu(x)
    y = If(cond) <
        then_branch = then_g () => (float[1,2,4,3] t) {
            c = Transpose<perm = [0, 2, 1, 3]>(a)
            d = Transpose<perm = [0, 2, 3, 1]>(c)
            t = Sigmoid(d)
        },
        else_branch = else_g () => (float[1,2,4,3] e) {
            e = Transpose<perm = [0, 1, 3, 2]>(a)
        }
    >
}"""
    before = make_model(text)
    after, _ = apply(before, RULES)
    assert histogram(after, recurse=True) == {"Relu": 1, "If": 1, "Transpose": 2, "Sigmoid": 1}
    feeds = {
        "cond": np.array(True),
        "x": np.random.default_rng(0).normal(size=(1, 2, 3, 4)).astype(np.float32),
    }
    assert_rewritten(before, after, {"Relu": 1, "If": 1}, feeds=feeds)


def test_custom_domain_producer_is_not_merged():
    text = """<ir_version: 10, opset_import: ["" : 14, "com.custom" : 1]>
g (float[1,2,3,4] x) => (float[1,3,4,2] y) {
    a = Relu(x)
    c = com.custom.Transpose<perm = [0, 2, 1, 3]>(a)
    b = Transpose<perm = [0, 2, 3, 1]>(c)
    y = Sigmoid(b)
}"""
    before = make_model(text)
    after, stats = apply(before, RULES)
    assert sum(stats.applied.values()) == 0
    assert histogram(after) == histogram(before)
