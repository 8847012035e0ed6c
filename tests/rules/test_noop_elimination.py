"""Tests for rules/noop_elimination.py: nodes that return their input are bypassed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxshrink.engine.passes import PassStats, RuleContext
from onnxshrink.rules.noop_elimination import RULES, RemoveInferenceDropout
from tests.helpers import apply, assert_rewritten, assert_unchanged, histogram, make_model

I64_MAX = 9223372036854775807


def _model(
    body: str, opset: int = 14, x: str = "float[2,3,4]", y: str = "float[2,3,4]", **inits
) -> onnx.ModelProto:
    # x goes through Relu first and y out through Sigmoid, so that a bypass is a plain rewire
    # (graph inputs and outputs at the pattern's ends are tested on their own below).
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
g ({x} x) => ({y} y) {{
    a = Relu(x)
{body}
    y = Sigmoid(b)
}}"""
    return make_model(text, inits)


def _removed(body: str, opset: int = 14, **kwargs) -> None:
    before = _model(body, opset, **kwargs)
    after, stats = apply(before, RULES)
    assert sum(stats.applied.values()) >= 1, dict(stats.declined)
    assert_rewritten(before, after, {"Relu": 1, "Sigmoid": 1})


def _kept(body: str, opset: int = 14, **kwargs) -> None:
    before = _model(body, opset, **kwargs)
    after, stats = apply(before, RULES)
    assert sum(stats.applied.values()) == 0
    assert_unchanged(before, after)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# --- positive cases -----------------------------------------------------------------------

POSITIVE = {
    "identity": ("b = Identity(a)", 14, {}),
    "identity_chain": ("c = Identity(a)\n b = Identity(c)", 14, {}),
    "dropout_opset13_no_training_input": ("b = Dropout(a)", 13, {}),
    "dropout_opset13_training_false": (
        "b = Dropout(a, r, t)",
        13,
        {"r": np.array(0.5, np.float32), "t": np.array(False)},
    ),
    "dropout_opset10_unused_mask": ("b, m = Dropout<ratio = 0.3>(a)", 10, {}),
    "cast_same_type": ("b = Cast<to = 1>(a)", 14, {}),
    "castlike_same_type": ("b = CastLike(a, like)", 15, {"like": np.zeros(1, np.float32)}),
    "reshape_same_static_shape": ("b = Reshape(a, s)", 14, {"s": _i64(2, 3, 4)}),
    "reshape_copy_and_infer": ("b = Reshape(a, s)", 14, {"s": _i64(0, -1, 4)}),
    "transpose_identity_perm": ("b = Transpose<perm = [0, 1, 2]>(a)", 14, {}),
    "pad_zero_input": ("b = Pad(a, p)", 13, {"p": _i64(0, 0, 0, 0, 0, 0)}),
    "pad_zero_attribute": ("b = Pad<pads = [0, 0, 0, 0, 0, 0]>(a)", 10, {}),
    "expand_same_shape": ("b = Expand(a, s)", 14, {"s": _i64(3, 4)}),
    "expand_ones": ("b = Expand(a, s)", 14, {"s": _i64(1, 1, 1)}),
    "tile_ones": ("b = Tile(a, s)", 14, {"s": _i64(1, 1, 1)}),
    "slice_full_int64_max": (
        "b = Slice(a, st, en, ax)",
        14,
        {"st": _i64(0, 0), "en": _i64(I64_MAX, I64_MAX), "ax": _i64(1, 2)},
    ),
    "slice_full_static_negative": (
        "b = Slice(a, st, en)",
        14,
        {"st": _i64(-2), "en": _i64(2)},
    ),
    "slice_full_attributes_opset9": ("b = Slice<starts = [0], ends = [100], axes = [2]>(a)", 9, {}),
    "add_zero": ("b = Add(a, z)", 14, {"z": np.zeros((3, 4), np.float32)}),
    "zero_add": ("b = Add(z, a)", 14, {"z": np.zeros((1, 4), np.float32)}),
    "sub_zero": ("b = Sub(a, z)", 14, {"z": np.array(0.0, np.float32)}),
    "mul_one": ("b = Mul(a, o)", 14, {"o": np.ones((1, 1, 1), np.float32)}),
    "one_mul": ("b = Mul(o, a)", 14, {"o": np.ones(4, np.float32)}),
    "div_one": ("b = Div(a, o)", 14, {"o": np.ones(1, np.float32)}),
    "pow_one": ("b = Pow(a, o)", 14, {"o": np.array(1.0, np.float32)}),
    "concat_single": ("b = Concat<axis = 1>(a)", 14, {}),
    "sum_single": ("b = Sum(a)", 14, {}),
    "max_single": ("b = Max(a)", 14, {}),
    "split_single_output": ("b = Split<axis = 1>(a)", 14, {}),
    "split_single_output_sized": ("b = Split<axis = 1>(a, s)", 14, {"s": _i64(3)}),
}


@pytest.mark.parametrize("case", POSITIVE.values(), ids=POSITIVE.keys())
def test_noop_is_removed(case):
    body, opset, inits = case
    _removed(body, opset, **inits)


def test_flatten_of_rank_two_is_removed():
    _removed("b = Flatten<axis = 1>(a)", x="float[6,4]", y="float[6,4]")


def test_reshape_with_dynamic_batch_copied_is_removed():
    _removed("b = Reshape(a, s)", x="float[N,3,4]", y="float[N,3,4]", s=_i64(0, 3, 4))


# --- negative cases -----------------------------------------------------------------------

NEGATIVE = {
    "dropout_training_true": (
        "b = Dropout(a, r, t)",
        13,
        {"r": np.array(0.0, np.float32), "t": np.array(True)},
    ),
    "cast_other_type": ("c = Cast<to = 10>(a)\n b = Cast<to = 1>(c)", 14, {}),
    "reshape_other_shape": (
        "c = Reshape(a, s)\n b = Reshape(c, t)",
        14,
        {"s": _i64(6, 4), "t": _i64(2, 3, 4)},
    ),
    "transpose_permutes": (
        "c = Transpose<perm = [0, 2, 1]>(a)\n b = Transpose<perm = [0, 2, 1]>(c)",
        14,
        {},
    ),
    "pad_nonzero": (
        "c = Pad(a, p)\n b = Slice(c, st, en, ax)",
        13,
        {
            "p": _i64(0, 1, 0, 0, 0, 0),
            "st": _i64(1),
            "en": _i64(4),
            "ax": _i64(1),
        },
    ),
    "slice_partial": (
        "c = Slice(a, st, en)\n b = Concat<axis = 0>(c, c)",
        14,
        {"st": _i64(1), "en": _i64(I64_MAX)},
    ),
    "slice_reversed": (
        "b = Slice(a, st, en, ax, sp)",
        14,
        {
            "st": _i64(-1),
            "en": _i64(-I64_MAX),
            "ax": _i64(0),
            "sp": _i64(-1),
        },
    ),
    "add_nonzero": ("b = Add(a, z)", 14, {"z": np.full((3, 4), 1e-3, np.float32)}),
    "zero_minus_x": ("b = Sub(z, a)", 14, {"z": np.zeros(1, np.float32)}),
    "one_over_x": ("b = Div(o, a)", 14, {"o": np.ones(1, np.float32)}),
    "concat_two": (
        "c = Concat<axis = 0>(a, a)\n b = Slice(c, st, en)",
        14,
        {"st": _i64(0), "en": _i64(2)},
    ),
}


@pytest.mark.parametrize("case", NEGATIVE.values(), ids=NEGATIVE.keys())
def test_not_a_noop_is_kept(case):
    body, opset, inits = case
    _kept(body, opset, **inits)


def test_neutral_constant_that_broadcasts_x_is_kept():
    # x + zeros[2,2,3,4] has shape [2,2,3,4]: not x.
    _kept("b = Add(a, z)", y="float[2,2,3,4]", z=np.zeros((2, 2, 3, 4), np.float32))


def test_neutral_constant_of_higher_rank_is_kept():
    _kept("b = Mul(a, o)", y="float[1,2,3,4]", o=np.ones((1, 1, 1, 1), np.float32))


def test_expand_that_grows_is_kept():
    _kept("b = Expand(a, s)", y="float[5,2,3,4]", s=_i64(5, 1, 1, 1))


def test_reshape_of_dynamic_dim_to_a_number_is_kept():
    _kept("b = Reshape(a, s)", x="float[N,3,4]", y="float[N,3,4]", s=_i64(2, 3, 4))


def test_dropout_with_used_mask_is_kept():
    text = """<ir_version: 10, opset_import: ["" : 13]>
g (float[2,3] x) => (float[2,3] y, bool[2,3] m) {
    a = Relu(x)
    b, m = Dropout(a)
    y = Sigmoid(b)
}"""
    before = make_model(text)
    after, stats = apply(before, RULES)
    assert stats.declined[("remove-inference-dropout", "a second output is used")] >= 1
    assert_unchanged(before, after)


def test_dropout_before_opset_7_needs_is_test():
    # onnxruntime cannot run opset 6, so this checks the rule's decision directly.
    graph = gs.Graph(opset=6)
    rule = RemoveInferenceDropout()
    x = gs.Variable("x", np.float32, [2])
    training = gs.Node("Dropout", attrs={"is_test": 0}, inputs=[x], outputs=[gs.Variable("y")])
    testing = gs.Node("Dropout", attrs={"is_test": 1}, inputs=[x], outputs=[gs.Variable("z")])
    ctx = RuleContext(graph, graph, 6, PassStats())
    assert rule.match(training, ctx) is None
    assert rule.match(testing, ctx) is not None


def test_custom_domain_identity_is_kept():
    text = """<ir_version: 10, opset_import: ["" : 14, "com.custom" : 1]>
g (float[2,3] x) => (float[2,3] y) {
    a = Relu(x)
    b = com.custom.Identity(a)
    y = Sigmoid(b)
}"""
    before = make_model(text)
    after, stats = apply(before, RULES)
    assert sum(stats.applied.values()) == 0
    assert histogram(after) == histogram(before)


# --- graph inputs and outputs -------------------------------------------------------------


def test_identity_from_graph_input_to_graph_output_is_left_alone():
    # Bypassing would need an Identity to keep the output name: removing it again would loop.
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x) => (float[2,3] y) {
    y = Identity(x)
}"""
    before = make_model(text)
    after, stats = apply(before, RULES)
    assert sum(stats.applied.values()) == 0
    assert (
        stats.declined[
            ("remove-identity", "graph output fed by a graph input, constant or shared tensor")
        ]
        == 1
    )
    assert_rewritten(before, after, {"Identity": 1})


def test_noop_from_graph_input_to_graph_output_becomes_identity_once():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x) => (float[2,3] y) {
    y = Cast<to = 1>(x)
}"""
    before = make_model(text)
    after, stats = apply(before, RULES)
    assert stats.applied["remove-same-type-cast"] == 1
    assert_rewritten(before, after, {"Identity": 1})


def test_identity_feeding_graph_output_is_removed_and_name_kept():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x) => (float[2,3] y) {
    a = Relu(x)
    y = Identity(a)
}"""
    before = make_model(text)
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Relu": 1})
    assert after.graph.node[0].output[0] == "y"


def test_identity_from_shared_tensor_to_graph_output_is_kept():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
    a = Relu(x)
    y = Identity(a)
    z = Sigmoid(a)
}"""
    before = make_model(text)
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Relu": 1, "Identity": 1, "Sigmoid": 1})


def test_noop_with_graph_output_in_the_middle_keeps_that_output():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x) => (float[2,3] y, float[2,3] b) {
    a = Relu(x)
    b = Identity(a)
    y = Sigmoid(b)
}"""
    before = make_model(text)
    after, _ = apply(before, RULES)
    assert_rewritten(before, after, {"Relu": 1, "Sigmoid": 1})


# --- subgraphs ----------------------------------------------------------------------------

IF_TEXT = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[2,3] x) => (float[2,3] y) {{
    z = Relu(x)
    y = If(cond) <
        then_branch = then_g () => (float[2,3] t) {{ {then} }},
        else_branch = else_g () => (float[2,3] e) {{ e = Neg(z) }}
    >
}}"""


def _if_feeds() -> dict[str, np.ndarray]:
    return {"cond": np.array(True), "x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2}


def test_noops_inside_if_branch_are_removed():
    before = make_model(
        IF_TEXT.format(then="c = Identity(z)\n d = Transpose<perm = [0, 1]>(c)\n t = Sigmoid(d)")
    )
    after, _ = apply(before, RULES)
    assert histogram(after, recurse=True) == {"Relu": 1, "If": 1, "Sigmoid": 1, "Neg": 1}
    assert_rewritten(before, after, {"Relu": 1, "If": 1}, feeds=_if_feeds())


def test_branch_output_read_from_outer_scope_is_kept():
    before = make_model(IF_TEXT.format(then="t = Identity(z)"))
    after, stats = apply(before, RULES)
    assert stats.declined[("remove-identity", "body output read from the outer scope")] == 1
    assert histogram(after, recurse=True) == histogram(before, recurse=True)
    assert_rewritten(before, after, {"Relu": 1, "If": 1}, feeds=_if_feeds())
