"""Tests for rules/constant_folding.py: shape values, Reshape targets, constant subexpressions."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs

from onnxshrink.engine.passes import PassStats, RuleContext
from onnxshrink.rules.constant_folding import fold_constants
from onnxshrink.rules.dead_code import constants_to_initializers
from tests.helpers import apply, assert_rewritten, histogram, make_model, run

PASSES = [constants_to_initializers, fold_constants]


def _ctx(graph: gs.Graph, opset: int) -> RuleContext:
    return RuleContext(graph, graph, opset, PassStats())


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _reshape_target(model: onnx.ModelProto) -> list[int]:
    node = next(n for n in model.graph.node if n.op_type == "Reshape")
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    return onnx.numpy_helper.to_array(init).tolist()


# --- case 3: constant subexpressions ------------------------------------------------------


def test_constant_subexpression_is_folded():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x) => (float[2,3] y) {
    k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
    two = Constant<value = float {2.0}>()
    s = Mul(k, two)
    e = Exp(s)
    y = Mul(x, e)
}"""
    before = make_model(text)
    after, stats = apply(before, PASSES)
    assert stats.applied["fold_constants"] == 1
    assert_rewritten(before, after, {"Mul": 1})


def test_reshaped_conv_bias_is_folded():
    # The paddle2onnx pattern: Reshape(bias, [1, C, 1, 1]) then Add.
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[1,4,3,3] x) => (float[1,4,3,3] y) {
    r = Reshape(bias, shape)
    y = Add(x, r)
}"""
    before = make_model(text, {"bias": np.arange(4, dtype=np.float32), "shape": _i64(1, -1, 1, 1)})
    after, _ = apply(before, PASSES)
    assert_rewritten(before, after, {"Add": 1})
    assert [list(i.dims) for i in after.graph.initializer] == [[1, 4, 1, 1]]


def test_folded_graph_output_is_a_constant_node_and_the_pass_settles():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[3] x) => (float[3] y, float[3] k) {
    a = Constant<value = float[3] {1.0, 2.0, 3.0}>()
    k = Neg(a)
    y = Add(x, a)
}"""
    before = make_model(text)
    graph = gs.import_onnx(before)
    assert fold_constants(graph, _ctx(graph, 14)) is True
    graph.cleanup().toposort()
    assert fold_constants(graph, _ctx(graph, 14)) is False
    after, _ = apply(before, PASSES)
    assert_rewritten(before, after, {"Constant": 1, "Add": 1})
    assert after.graph.output[1].name == "k"


def test_initializer_that_is_a_graph_output_gets_a_constant_node():
    """Found by bench/fuzz.py: an initializer that is itself a graph output became a Variable
    without a type, and exporting the graph failed (an internal error)."""
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[3] x) => (float[3] y, float[3] w) {
    y = Add(x, w)
}"""
    before = make_model(text, {"w": np.array([1.0, 2.0, 3.0], np.float32)})
    after, _ = apply(before, PASSES)
    assert_rewritten(before, after, {"Constant": 1, "Add": 1})
    assert [o.name for o in after.graph.output] == ["y", "w"]


def test_nothing_to_fold_reports_no_change():
    before = make_model("""<ir_version: 10, opset_import: ["" : 14]>
g (float[3] x) => (float[3] y) { y = Relu(x) }""")
    graph = gs.import_onnx(before)
    assert fold_constants(graph, _ctx(graph, 14)) is False


def test_folding_is_deterministic():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[2,3] x) => (float[2,3] y) {
    s = Sqrt(k)
    t = Transpose<perm = [1, 0]>(s)
    y = Mul(x, t)
}"""
    before = make_model(text, {"k": np.arange(6, dtype=np.float32).reshape(3, 2)})
    first, _ = apply(before, PASSES)
    second, _ = apply(before, PASSES)
    assert first.SerializeToString() == second.SerializeToString()


# --- case 3: size guard -------------------------------------------------------------------

GROWING = {
    "constant_of_shape": "big = ConstantOfShape<value = float[1] {1.0}>(shape)",
    "expand": "big = Expand(one, shape)",
    "tile": "big = Tile(row, reps)",
    "range_then_cast": "r = Range(start, limit, delta)\n big = Cast<to = 1>(r)",
}


def _growing_model(body: str) -> onnx.ModelProto:
    text = f"""<ir_version: 10, opset_import: ["" : 14]>
g (float[4096] x) => (float[4096] y) {{
    {body}
    y = Add(x, big)
}}"""
    inits = {
        "shape": _i64(4096),
        "one": np.ones(1, np.float32),
        "row": np.ones(16, np.float32),
        "reps": _i64(256),
        "start": np.array(0, np.int64),
        "limit": np.array(4096, np.int64),
        "delta": np.array(1, np.int64),
    }
    used = {name: value for name, value in inits.items() if name in body}
    return make_model(text, used)


def test_growing_folds_are_refused():
    for name, body in GROWING.items():
        before = _growing_model(body)
        after, _ = apply(before, PASSES)
        assert histogram(after) == histogram(before), name
        assert after.ByteSize() <= before.ByteSize() + 64, name


def test_small_constant_of_shape_is_folded():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[8] x) => (float[8] y) {
    big = ConstantOfShape<value = float[1] {0.5}>(shape)
    y = Add(x, big)
}"""
    before = make_model(text, {"shape": _i64(8)})
    after, _ = apply(before, PASSES)
    assert_rewritten(before, after, {"Add": 1})


def _anchor_grid_model(columns: int) -> onnx.ModelProto:
    # A detector head's grid, 4 KB made from a shape, before a MatMul with 1024 x `columns`
    # weights.
    text = f"""<ir_version: 10, opset_import: ["" : 14]>
g (float[1,1024] x) => (float[1,{columns}] y) {{
    grid = ConstantOfShape<value = float[1] {{0.5}}>(shape)
    s = Add(x, grid)
    y = MatMul(s, w)
}}"""
    w = np.random.default_rng(0).normal(size=(1024, columns)).astype(np.float32)
    return make_model(text, {"shape": _i64(1, 1024), "w": w})


def test_growth_beyond_the_allowance_is_charged_to_the_model_budget():
    # 4 KB of growth: over the 1 KiB allowance, within 0.5% of a 1 MB model's constants.
    before = _anchor_grid_model(256)
    after, _ = apply(before, PASSES)
    assert_rewritten(before, after, {"Add": 1, "MatMul": 1})


def test_growth_over_the_budget_of_a_small_model_is_refused():
    # The same 4 KB next to 8 KB of weights: 0.5% is 40 bytes.
    before = _anchor_grid_model(2)
    after, _ = apply(before, PASSES)
    assert_rewritten(before, after, {"ConstantOfShape": 1, "Add": 1, "MatMul": 1})
    assert after.ByteSize() <= before.ByteSize() + 64


def test_weight_read_by_both_branches_is_not_folded_twice():
    # Transposing the weight in each branch would store it twice (once per branch). The weight
    # is an outer Constant node, which constants_to_initializers keeps for the same reason.
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[64,64] x) => (float[64,64] y) {
    y = If(cond) <
        then_branch = then_g () => (float[64,64] t) {
            wt = Transpose<perm = [1, 0]>(w)
            t = MatMul(x, wt)
        },
        else_branch = else_g () => (float[64,64] e) {
            wt2 = Transpose<perm = [1, 0]>(w)
            e = Add(x, wt2)
        }
    >
}"""
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    before = onnx.parser.parse_model(text)
    before.graph.node.insert(
        0, onnx.helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w))
    )
    onnx.checker.check_model(before, full_check=True)
    after, _ = apply(before, PASSES)
    assert histogram(after, recurse=True) == {
        "Constant": 1,
        "If": 1,
        "Transpose": 2,
        "MatMul": 1,
        "Add": 1,
    }
    assert after.ByteSize() <= before.ByteSize() + 64


def test_random_ops_are_not_folded():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[4] x) => (float[4] y) {
    r = RandomUniformLike(k)
    y = Add(x, r)
}"""
    before = make_model(text, {"k": np.zeros(4, np.float32)})
    after, _ = apply(before, PASSES)
    assert histogram(after) == {"RandomUniformLike": 1, "Add": 1}


def test_folding_inside_if_branch():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (bool cond, float[3] x) => (float[3] y) {
    y = If(cond) <
        then_branch = then_g () => (float[3] t) {
            k = Constant<value = float[3] {1.0, 4.0, 9.0}>()
            s = Sqrt(k)
            t = Mul(x, s)
        },
        else_branch = else_g () => (float[3] e) { e = Neg(x) }
    >
}"""
    before = make_model(text)
    after, _ = apply(before, PASSES)
    assert histogram(after, recurse=True) == {"If": 1, "Mul": 1, "Neg": 1}
    feeds = {"cond": np.array(True), "x": np.array([1.0, -2.0, 3.0], np.float32)}
    assert_rewritten(before, after, {"If": 1}, feeds=feeds)


# --- cases 1 and 2: shape computations ----------------------------------------------------

SHAPE_CHAIN = """<ir_version: 10, opset_import: ["" : 13]>
g (float[{dims}] x) => (float[{out}] y) {{
    s = Shape(x)
    s32 = Cast<to = 6>(s)
    c = Slice(s32, one, two)
    c64 = Cast<to = 7>(c)
    n = Gather(s, zero)
    n1 = Unsqueeze(n, zero1)
    shape = Concat<axis = 0>(n1, c64, minus1)
    y = Reshape(x, shape)
}}"""
SHAPE_INITS = {
    "one": _i64(1),
    "two": _i64(2),
    "zero": np.array(0, np.int64),
    "zero1": _i64(0),
    "minus1": _i64(-1),
}


def test_static_shape_chain_folds_to_a_constant_target():
    before = make_model(SHAPE_CHAIN.format(dims="2,3,4,5", out="2,3,20"), SHAPE_INITS)
    after, _ = apply(before, PASSES)
    assert_rewritten(before, after, {"Reshape": 1})
    assert _reshape_target(after) == [2, 3, -1]


def test_partially_dynamic_shape_chain_uses_copy_and_static_dims():
    # Batch is dynamic (becomes 0: copy of the Reshape's own dim 0), channels static.
    before = make_model(SHAPE_CHAIN.format(dims="N,3,H,W", out="N,3,?"), SHAPE_INITS)
    after, stats = apply(before, PASSES)
    assert _reshape_target(after) == [0, 3, -1]
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)}
    assert_rewritten(before, after, {"Reshape": 1}, feeds=feeds)


def test_single_dynamic_entry_becomes_minus_one():
    text = """<ir_version: 10, opset_import: ["" : 13]>
g (float[N,12] x, float[M,4] z) => (float[?,4,3] y) {
    s = Shape(z)
    m = Slice(s, zero, one)
    shape = Concat<axis = 0>(m, four, three)
    y = Reshape(x, shape)
}"""
    before = make_model(text, {"zero": _i64(0), "one": _i64(1), "four": _i64(4), "three": _i64(3)})
    after, _ = apply(before, PASSES)
    assert _reshape_target(after) == [-1, 4, 3]
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.normal(size=(8, 12)).astype(np.float32),
        "z": rng.normal(size=(8, 4)).astype(np.float32),
    }
    assert_rewritten(before, after, {"Reshape": 1}, feeds=feeds)


def test_same_symbolic_dim_of_another_tensor_is_copied():
    # Reshape(a, Shape(b)) where a and b share symbolic dims: a no-op target [0, 4, 0].
    text = """<ir_version: 10, opset_import: ["" : 13]>
g (float[N,4,T] x) => (float[N,4,T] y) {
    a = Relu(x)
    b = Sigmoid(x)
    s = Shape(b)
    r = Reshape(a, s)
    y = Add(r, b)
}"""
    before = make_model(text)
    after, _ = apply(before, PASSES)
    assert _reshape_target(after) == [0, 4, 0]
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)}
    assert_rewritten(before, after, {"Relu": 1, "Sigmoid": 1, "Reshape": 1, "Add": 1}, feeds=feeds)


def test_two_unrelated_dynamic_entries_are_kept():
    text = """<ir_version: 10, opset_import: ["" : 13]>
g (float[N,12] x, float[A,B] z) => (float[?,?] y) {
    shape = Shape(z)
    y = Reshape(x, shape)
}"""
    before = make_model(text)
    after, _ = apply(before, PASSES)
    assert histogram(after) == {"Shape": 1, "Reshape": 1}


def test_integer_arithmetic_on_shapes_folds():
    text = """<ir_version: 10, opset_import: ["" : 13]>
g (float[N,6,4] x) => (float[?,?] y) {
    s = Shape(x)
    c = Gather(s, one)
    h = Gather(s, two)
    p = Mul(c, h)
    q = Div(p, two64)
    q1 = Unsqueeze(q, zero1)
    shape = Concat<axis = 0>(minus1, q1)
    y = Reshape(x, shape)
}"""
    inits = {
        "one": np.array(1, np.int64),
        "two": np.array(2, np.int64),
        "two64": np.array(2, np.int64),
        "zero1": _i64(0),
        "minus1": _i64(-1),
    }
    before = make_model(text, inits)
    after, _ = apply(before, PASSES)
    assert _reshape_target(after) == [-1, 12]
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 6, 4)).astype(np.float32)}
    assert_rewritten(before, after, {"Reshape": 1}, feeds=feeds)


def test_shape_folding_inside_if_branch_reads_outer_shapes():
    text = """<ir_version: 10, opset_import: ["" : 13]>
g (bool cond, float[2,3] x) => (int64[2] y) {
    y = If(cond) <
        then_branch = then_g () => (int64[2] t) {
            s = Shape(x)
            t = Add(s, one)
        },
        else_branch = else_g () => (int64[2] e) { e = Shape(x) }
    >
}"""
    before = make_model(text, {"one": _i64(1)})
    after, _ = apply(before, PASSES)
    assert histogram(after, recurse=True) == {"If": 1, "Constant": 2}
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.zeros((2, 3), np.float32)}
        np.testing.assert_array_equal(run(after, feeds)[0], run(before, feeds)[0])
    onnx.checker.check_model(after, full_check=True)


# --- case 4: If with a constant condition; case 5: Range bounds ---------------------------


def _ort_loads(model: onnx.ModelProto) -> None:
    """ORT with its default graph optimizations, which inline an If with a constant condition."""
    import onnxruntime as ort

    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# The pattern of ONNX's own AffineGrid function: the If picks [1]-shaped dims out of a size
# tensor, and Range reads one of them as its limit. ORT's Range kernel takes a one-element
# tensor; its shape inference only insists on a scalar when it can read the value. ORT does
# not fold Size of a graph input itself, so it loads the original.
RANGE_OF_IF = """<ir_version: 10, opset_import: ["" : 18]>
g (int64[3] size) => (int64[?] y, int64[?] w) {
    rank = Size(size)
    three = Constant<value = int64 {3}>()
    cond = Equal(rank, three)
    d, w = If(cond) <
        then_branch = then_g () => (d_then, w_then) {
            d_then = Identity(one_1d)
            n_then, w_then, c_then = Split<num_outputs = 3>(size)
        },
        else_branch = else_g () => (d_else, w_else) {
            d_else = Identity(two_1d)
            w_else = Identity(two_1d)
        }
    >
    zero = Constant<value = int64 {0}>()
    one = Constant<value = int64 {1}>()
    y = Range(zero, d, one)
    wd = Concat<axis = 0>(w, d)
}"""


def test_if_with_a_constant_condition_is_inlined_and_range_bounds_become_scalars():
    """Case 4 and 5: folding makes the condition constant; without inlining, ORT inlines it
    at load and Range's shape inference then sees the constant [1] bound and fails."""
    before = make_model(
        RANGE_OF_IF.replace(", int64[?] w)", ", int64[?] wd)"),
        {"one_1d": _i64(1), "two_1d": _i64(2)},
    )
    _ort_loads(before)
    after, stats = apply(before, PASSES)
    assert stats.applied["fold_constants"] >= 1
    _ort_loads(after)
    assert_rewritten(
        before, after, {"Split": 1, "Concat": 1, "Constant": 1}, feeds={"size": _i64(4, 6, 8)}
    )


def test_constant_one_element_range_bound_becomes_a_scalar():
    """Case 5: Unsqueeze(Size(x)) folds to a [1] constant; Range needs a scalar to load."""
    text = """<ir_version: 10, opset_import: ["" : 18]>
g (float[2,5] x) => (int64[?] y) {
    s = Size(x)
    n = Unsqueeze(s, axes)
    zero = Constant<value = int64 {0}>()
    one = Constant<value = int64 {1}>()
    y = Range(zero, n, one)
}"""
    before = make_model(text, {"axes": _i64(0)})
    _ort_loads(before)
    after, _ = apply(before, PASSES)
    _ort_loads(after)
    assert_rewritten(before, after, {"Constant": 1})
    folded = onnx.numpy_helper.to_array(after.graph.node[0].attribute[0].t)
    assert folded.tolist() == list(range(10))


def test_if_with_a_runtime_condition_is_kept():
    """Case 4, negative: a condition that depends on the inputs keeps the If."""
    text = """<ir_version: 10, opset_import: ["" : 18]>
g (bool cond, float[3] x) => (float[3] y) {
    y = If(cond) <
        then_branch = then_g () => (float[3] t) { t = Neg(x) },
        else_branch = else_g () => (float[3] e) { e = Abs(x) }
    >
}"""
    before = make_model(text)
    after, stats = apply(before, PASSES)
    assert not stats.applied["fold_constants"]
    assert histogram(after, recurse=True) == histogram(before, recurse=True)
    onnx.checker.check_model(after, full_check=True)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.array([1.0, -2.0, 3.0], np.float32)}
        np.testing.assert_array_equal(run(after, feeds)[0], run(before, feeds)[0])


def test_inlined_branch_keeps_output_names_and_renames_clashing_locals():
    """Case 4: the taken branch's tensors move into the outer graph; a local name that another
    If's branch also uses is renamed, and a branch output that is an outer tensor or a
    constant still reaches the If's output, whose name (a graph output) is kept."""
    text = """<ir_version: 10, opset_import: ["" : 18]>
g (bool c, float[3] x) => (float[3] y, float[3] z, float[3] k) {
    t = Constant<value = bool {1}>()
    y = If(t) <
        then_branch = a () => (float[3] a_out) { tmp = Neg(x)  a_out = Mul(tmp, tmp) },
        else_branch = b () => (float[3] b_out) { b_out = Abs(x) }
    >
    z = If(c) <
        then_branch = c1 () => (float[3] c_out) { tmp = Sin(x)  c_out = Add(tmp, x) },
        else_branch = c2 () => (float[3] d_out) { d_out = Identity(x) }
    >
    k = If(t) <
        then_branch = e () => (float[3] e_out) { e_out = Identity(x) },
        else_branch = f () => (float[3] f_out) { f_out = Identity(x) }
    >
}"""
    before = make_model(text)
    after, _ = apply(before, PASSES)
    assert histogram(after) == {"Neg": 1, "Mul": 1, "If": 1, "Identity": 1}
    names = [o for n in after.graph.node for o in n.output]
    assert "tmp" not in names  # the second If's branch still defines tmp
    _ort_loads(after)
    for cond in (True, False):
        feeds = {"c": np.array(cond), "x": np.array([1.0, -2.0, 3.0], np.float32)}
        assert_rewritten(before, after, histogram(after), feeds=feeds)


# --- case 3: folding never runs unbounded work (issue 9, 7) -------------------------------


def test_loop_with_endless_trip_count_is_not_evaluated() -> None:
    """A Loop of constants whose trip count is INT64_MAX: folding it would never return."""
    import threading

    text = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
    n = Constant<value = int64 {9223372036854775807}>()
    c = Constant<value = bool {1}>()
    s = Constant<value = float[2] {1.0, 2.0}>()
    l = Loop(n, c, s) <body = body (int64 i, bool cin, float[2] v) => (bool cout, float[2] w) {
        cout = Identity(cin)
        w = Identity(v)
    }>
    y = Add(x, l)
}"""
    before = make_model(text)
    done: list[onnx.ModelProto] = []
    worker = threading.Thread(target=lambda: done.append(apply(before, PASSES)[0]), daemon=True)
    worker.start()
    worker.join(60)
    assert done, "constant folding evaluated the endless Loop"
    after = done[0]
    assert histogram(after) == {"Loop": 1, "Add": 1}
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == ["y"]  # not run: it would never end


def test_costly_matmul_of_constants_is_not_folded():
    """1024x1024 @ 1024x512 costs 2^29 multiply-adds and shrinks nothing much: left alone."""
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[1024,512] x) => (float[1024,512] y) {
    p = MatMul(a, b)
    y = Add(x, p)
}"""
    rng = np.random.default_rng(0)
    before = make_model(
        text,
        {
            "a": rng.normal(size=(1024, 1024)).astype(np.float32),
            "b": rng.normal(size=(1024, 512)).astype(np.float32),
        },
    )
    after, stats = apply(before, PASSES)
    assert not stats.applied.get("fold_constants")
    assert_rewritten(before, after, {"MatMul": 1, "Add": 1}, rtol=1e-5, atol=1e-3)


def test_cheap_matmul_of_constants_is_folded():
    text = """<ir_version: 10, opset_import: ["" : 14]>
g (float[16,8] x) => (float[16,8] y) {
    p = MatMul(a, b)
    y = Add(x, p)
}"""
    rng = np.random.default_rng(0)
    before = make_model(
        text,
        {
            "a": rng.normal(size=(16, 32)).astype(np.float32),
            "b": rng.normal(size=(32, 8)).astype(np.float32),
        },
    )
    after, stats = apply(before, PASSES)
    assert stats.applied["fold_constants"] == 1
    assert_rewritten(before, after, {"Add": 1})
