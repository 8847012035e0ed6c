"""Shared helpers for rule and engine tests: build tiny models in code, rewrite, compare."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxshrink.engine.optimize import rewrite_model
from onnxshrink.engine.passes import FunctionPass, Pass, PassStats, Rule, RuleContext, RulePass

#: a `graph, ctx -> modified` function, which `apply` wraps into a FunctionPass
GraphFunction = Callable[[gs.Graph, RuleContext], bool]


def make_model(
    text: str,
    initializers: dict[str, np.ndarray] | None = None,
    constant_nodes: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Parse onnx.parser model text; add numpy initializers and Constant nodes; check it.

    `constant_nodes` become Constant nodes at the top of the graph (as exporters write them).
    """
    model = onnx.parser.parse_model(text)
    for name, value in (initializers or {}).items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    for i, (name, value) in enumerate((constant_nodes or {}).items()):
        tensor = onnx.numpy_helper.from_array(np.asarray(value))
        model.graph.node.insert(i, onnx.helper.make_node("Constant", [], [name], value=tensor))
    onnx.checker.check_model(model, full_check=True)
    return model


def apply(
    model: onnx.ModelProto,
    rules: Sequence[Rule | Pass | GraphFunction] | Rule | Pass | GraphFunction,
) -> tuple[onnx.ModelProto, PassStats]:
    """Run rules (wrapped into one RulePass) and/or passes to a fixed point on a copy of `model`."""
    items = [rules] if not isinstance(rules, (list, tuple)) else list(rules)
    passes: list[Pass] = []
    pending: list[Rule] = []
    for item in items:
        if isinstance(item, Rule):
            pending.append(item)
        else:
            if pending:
                passes.append(RulePass("test-rules", pending))
                pending = []
            if not callable(item) or hasattr(item, "name"):
                passes.append(cast(Pass, item))  # named: a pass already (Pass is a Protocol)
            else:
                passes.append(FunctionPass(item.__name__, item))
    if pending:
        passes.append(RulePass("test-rules", pending))
    return rewrite_model(model, passes)


def scale_weights(graph: gs.Graph, ctx: RuleContext) -> bool:
    """A deliberately wrong pass for `debug_verify` tests: scales every float32 initializer by
    1.1 and reports the change (True), as an honest but broken pass would."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32:
            tensor.values = tensor.values * np.float32(1.1)
    return True


def histogram(model: onnx.ModelProto, recurse: bool = False) -> Counter[str]:
    """Op-type counts of the main graph (and subgraphs when `recurse`)."""
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            if recurse:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        walk(attr.g)
                    for sub in attr.graphs:
                        walk(sub)

    walk(model.graph)
    return counts


def random_feeds(
    model: onnx.ModelProto, seed: int = 0, low: float = -3.0, high: float = 3.0
) -> dict[str, np.ndarray]:
    """Random inputs for a model whose inputs all have static shapes."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tt = value.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.uniform(low, high, size=shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with ORT CPU, graph optimizations off so that ORT does not hide what we did."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)


def assert_rewritten(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    expected_ops: dict[str, int] | Counter[str],
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
    """The four checks every rule test makes: histogram, checker, parity, interface kept."""
    assert histogram(after) == Counter(expected_ops), f"ops after: {dict(histogram(after))}"
    onnx.checker.check_model(after, full_check=True)
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    feeds = feeds if feeds is not None else random_feeds(before, seed)
    for ref, got in zip(run(before, feeds), run(after, feeds), strict=True):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def assert_unchanged(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """A negative case: same op histogram, a valid model, the same interface and outputs."""
    assert histogram(after) == histogram(before), f"ops after: {dict(histogram(after))}"
    onnx.checker.check_model(after, full_check=True)
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    feeds = random_feeds(before, 0)
    try:
        expected = run(before, feeds)
    except Exception:  # ORT cannot run it (a custom domain): the nodes must be the same
        assert [_node_key(n) for n in after.graph.node] == [_node_key(n) for n in before.graph.node]
        return
    for ref, got in zip(expected, run(after, feeds), strict=True):
        np.testing.assert_array_equal(got, ref)


def _node_key(node: onnx.NodeProto) -> tuple:
    """What a node computes: domain, op, wiring, and attribute values (not their encoding)."""
    attrs: list[tuple[object, ...]] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            array = onnx.numpy_helper.to_array(attr.t)
            attrs.append((attr.name, str(array.dtype), array.shape, array.tobytes()))
        else:
            attrs.append((attr.name, attr.SerializeToString()))
    return (node.domain, node.op_type, tuple(node.input), tuple(node.output), tuple(sorted(attrs)))


def endless_loop_model() -> onnx.ModelProto:
    """y = x after a Loop whose trip count is INT64_MAX: ONNX Runtime would run it forever."""
    return make_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
    n = Constant<value = int64 {9223372036854775807}>()
    c = Constant<value = bool {1}>()
    y = Loop(n, c, x) <body = body (int64 i, bool cin, float[2] v) => (bool cout, float[2] w) {
        cout = Identity(cin)
        w = Identity(v)
    }>
}""")


def dense_net(batch: int | str = "N", takes_one_sample: bool = False) -> onnx.ModelProto:
    """x [batch, 16] -> MatMul, Relu, MatMul -> y [batch, 4]: a tiny model with weights to
    quantize, for the commands that take samples (axis 0 of an .npz).

    `batch` is the declared axis-0 dim ("N" dynamic, 1 pinned). `takes_one_sample` adds a
    Reshape to [1, 16] first: the model then declares a dynamic batch but fails on more than
    one sample, as exported models with a hard-coded shape do.
    """
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(size=(16, 32)).astype(np.float32) / 4,
        "w2": rng.normal(size=(32, 4)).astype(np.float32) / 6,
    }
    first = (
        "s = Constant<value = int64[2] {1, 16}>()\n    a = Reshape(x, s)"
        if takes_one_sample
        else "a = Identity(x)"
    )
    out = 1 if takes_one_sample else batch
    return make_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[{batch}, 16] x) => (float[{out}, 4] y) {{
    {first}
    h = MatMul(a, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}}""",
        weights,
    )


def sample_file(path, n: int, seed: int = 0) -> str:
    """An .npz of `n` samples of `dense_net`'s input along axis 0; returns its path."""
    x = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    np.savez(path, x=x)
    return str(path)
