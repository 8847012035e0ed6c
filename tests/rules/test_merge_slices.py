"""Tests for rules/merge_slices.py: a Slice of a Slice becomes one Slice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.rules import merge_slices
from onnxshrink.rules.merge_slices import merge_ranges
from tests.helpers import apply, assert_rewritten, assert_unchanged, make_model

RULES = merge_slices.RULES
BIG = 2**63 - 1


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _model(body: str, x: str, y: str, outputs: str = "", **inits) -> onnx.ModelProto:
    text = f"""<ir_version: 10, opset_import: ["" : 14]>
g ({x} x) => ({y} y{outputs}) {{
    a = Relu(x)
{body}
}}"""
    return make_model(text, inits)


def _focus_body() -> str:
    # YOLOX's Focus: rows then columns, four ways, concatenated on channels.
    return """
    r0 = Slice(a, z, big, ax2, two)
    r1 = Slice(a, one, big, ax2, two)
    p00 = Slice(r0, z, big, ax3, two)
    p01 = Slice(r0, one, big, ax3, two)
    p10 = Slice(r1, z, big, ax3, two)
    p11 = Slice(r1, one, big, ax3, two)
    y = Concat<axis = 1>(p00, p10, p01, p11)"""


def _focus_inits() -> dict[str, np.ndarray]:
    return dict(z=_i64(0), one=_i64(1), two=_i64(2), big=_i64(BIG), ax2=_i64(2), ax3=_i64(3))


def test_focus_slices_merge_on_disjoint_axes():
    before = _model(_focus_body(), "float[1,3,8,8]", "float[1,12,4,4]", **_focus_inits())
    after, stats = apply(before, RULES)
    assert stats.applied["merge-slices"] == 4
    assert_rewritten(before, after, {"Relu": 1, "Slice": 4, "Concat": 1})
    assert all(n.input[0] == "a" for n in after.graph.node if n.op_type == "Slice")


def test_same_axis_composes_on_a_static_length():
    body = """
    b = Slice(a, s1, e1, ax, t1)
    y = Slice(b, s2, e2, ax, t2)"""
    before = _model(
        body,
        "float[2,20]",
        "float[2,2]",
        s1=_i64(2), e1=_i64(18), t1=_i64(2), s2=_i64(1), e2=_i64(-3), t2=_i64(2), ax=_i64(1),
    )  # fmt: skip
    after, stats = apply(before, RULES)
    assert stats.applied["merge-slices"] == 1
    assert_rewritten(before, after, {"Relu": 1, "Slice": 1})


@pytest.mark.parametrize(
    "first, second",
    [((2, 18, 2), (1, -3, 2)), ((-1, -BIG, -1), (1, 6, 2)), ((0, BIG, 3), (-2, -BIG, -1))],
)
def test_composed_range_matches_python(first, second):
    merged = merge_ranges({0: first}, {0: second}, [20])
    assert merged is not None
    expected = list(range(20))[slice(*first)][slice(*second)]
    assert list(range(20))[slice(*merged[0])] == expected


def test_empty_composition_declines():
    assert merge_ranges({0: (0, 4, 1)}, {0: (5, 9, 1)}, [20]) is None


# --- negative cases -------------------------------------------------------------------------


def test_same_axis_with_dynamic_length_is_kept():
    body = """
    b = Slice(a, s1, e1, ax)
    y = Slice(b, s1, e1, ax)"""
    before = _model(body, "float[2,N]", "float[2,?]", s1=_i64(1), e1=_i64(BIG), ax=_i64(1))
    after, stats = apply(before, RULES)
    assert stats.applied["merge-slices"] == 0
    assert ("merge-slices", "same axis sliced twice without a static length") in stats.declined
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 7)).astype(np.float32)}
    assert_rewritten(before, after, {"Relu": 1, "Slice": 2}, feeds=feeds)


def test_inner_slice_with_another_reader_is_kept():
    body = """
    b = Slice(a, z, big, ax2, two)
    c = Slice(b, z, big, ax3, two)
    d = Sigmoid(b)
    e = Slice(d, z, big, ax3, two)
    y = Add(c, e)"""
    before = _model(body, "float[1,3,8,8]", "float[1,3,4,4]", **_focus_inits())
    after, stats = apply(before, RULES)
    assert stats.applied["merge-slices"] == 0
    assert ("merge-slices", "inner Slice has other readers") in stats.declined
    assert_unchanged(before, after)


def test_inner_slice_that_is_a_graph_output_is_kept():
    body = """
    b = Slice(a, z, big, ax2, two)
    y = Slice(b, z, big, ax3, two)"""
    before = _model(
        body, "float[1,3,8,8]", "float[1,3,4,4]", outputs=", float[1,3,4,8] b", **_focus_inits()
    )
    after, stats = apply(before, RULES)
    assert stats.applied["merge-slices"] == 0
    assert ("merge-slices", "inner Slice is a graph output") in stats.declined
    assert_unchanged(before, after)


def test_computed_parameters_are_kept():
    body = """
    s = Shape(a)
    n = Slice(s, ax3, four)
    b = Slice(a, z, n, ax3)
    y = Slice(b, z, big, ax2, two)"""
    before = _model(body, "float[1,3,8,N]", "float[1,3,4,?]", four=_i64(4), **_focus_inits())
    after, stats = apply(before, RULES)
    assert stats.applied["merge-slices"] == 0
    assert ("merge-slices", "inner Slice parameters are not constant") in stats.declined
    feeds = {"x": np.random.default_rng(0).normal(size=(1, 3, 8, 5)).astype(np.float32)}
    assert_rewritten(before, after, {"Relu": 1, "Shape": 1, "Slice": 3}, feeds=feeds)
