"""Localization ranks first the node that adds the error, on tiny models built in code."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink.verify.localize import localize
from onnxshrink.verify.parity import generate_inputs
from tests.helpers import make_model

_CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[1, 3, 12, 12] x) => (float[1, 4, 12, 12] y) {
    a = Conv <pads = [1, 1, 1, 1], group = 1> (x, w1, b1)
    ra = Relu (a)
    b = Conv <pads = [1, 1, 1, 1]> (ra, w2, b2)
    rb = Relu (b)
    y = Conv (rb, w3)
}
"""


def build_chain(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> Conv, weights as initializers, biases as Constant nodes."""
    rng = np.random.default_rng(seed)
    return make_model(
        _CHAIN,
        {
            "w1": rng.normal(scale=0.5, size=(8, 3, 3, 3)).astype(np.float32),
            "w2": rng.normal(scale=0.3, size=(8, 8, 3, 3)).astype(np.float32),
            "w3": rng.normal(scale=0.5, size=(4, 8, 1, 1)).astype(np.float32),
        },
        constant_nodes={
            "b1": rng.normal(size=8).astype(np.float32),
            "b2": rng.normal(size=8).astype(np.float32),
        },
    )


def perturbed(model: onnx.ModelProto, name: str, factor: float = 1.01) -> onnx.ModelProto:
    """A copy of `model` with initializer `name` scaled by `factor`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, t in enumerate(copy.graph.initializer):
        if t.name == name:
            values = onnx.numpy_helper.to_array(t) * np.float32(factor)
            copy.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(values, name))
            return copy
    raise KeyError(name)


def _feeds(model: onnx.ModelProto, n: int = 2):
    return [generate_inputs(model, seed=s, ranges={None: (-1.0, 1.0)}) for s in range(n)]


def _node_name(model: onnx.ModelProto, output: str) -> str:
    node = next(n for n in model.graph.node if output in n.output)
    return node.name or f"<{node.op_type} #{list(model.graph.node).index(node)}>"


def test_perturbed_middle_conv_ranks_first():
    ref = build_chain()
    cand = perturbed(ref, "w2")
    loc = localize(ref, cand, _feeds(ref))
    assert loc.reason is None and loc.samples == 2
    first = loc.nodes[0]
    assert first.op_type == "Conv" and first.output == "b"
    assert first.added == pytest.approx(0.01, rel=0.05)  # a uniform 1% scale of the weight
    assert first.input_error == 0.0
    # Every other node computes what the reference's does: not ranked (it cannot add error).
    assert [n.output for n in loc.nodes] == ["b"] and loc.unchanged == 4
    assert loc.nodes[0].error == pytest.approx(loc.nodes[0].added)
    # Bias Constant nodes and weights are not compared.
    assert loc.skipped["computed from constants only"] == 2
    assert loc.compared == 5


def test_identical_models_add_nothing():
    ref = build_chain()
    loc = localize(ref, ref, _feeds(ref, 1))
    assert loc.compared == 5 and loc.nodes == [] and loc.unchanged == 5


def test_localization_stops_after_the_requested_samples():
    ref = build_chain()
    seen = []
    loc = localize(ref, perturbed(ref, "w1"), _feeds(ref, 4), 3, lambda d, t: seen.append((d, t)))
    assert loc.samples == 3 and seen == [(1, 3), (2, 3), (3, 3)]
    assert loc.nodes[0].output == "a"


def _qdq(scale: float, rename: bool) -> onnx.ModelProto:
    """The chain with `ra` fake-quantized before the second Conv.

    rename=False: `ra -> Q -> DQ -> ra_dq` (the dequantized tensor has a new name);
    rename=True: the Relu writes `ra_f` and the DQ takes over the name `ra`.
    """
    ref = build_chain()
    cand = onnx.ModelProto()
    cand.CopyFrom(ref)
    graph = cand.graph
    relu = next(n for n in graph.node if n.op_type == "Relu" and n.output[0] == "ra")
    source = "ra_f" if rename else "ra"
    dequantized = "ra" if rename else "ra_dq"
    relu.output[0] = source
    index = list(graph.node).index(relu) + 1
    q = onnx.helper.make_node("QuantizeLinear", [source, "s", "zp"], ["ra_q"], name="q")
    dq = onnx.helper.make_node("DequantizeLinear", ["ra_q", "s", "zp"], [dequantized], name="dq")
    graph.node.insert(index, dq)
    graph.node.insert(index, q)
    if not rename:
        conv = next(n for n in graph.node if n.op_type == "Conv" and n.output[0] == "b")
        conv.input[0] = "ra_dq"
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(scale, np.float32), "s"),
            onnx.numpy_helper.from_array(np.array(0, np.uint8), "zp"),
        ]
    )
    onnx.checker.check_model(cand, full_check=True)
    return cand


@pytest.mark.parametrize("rename", [False, True])
def test_qdq_pair_is_compared_with_the_float_tensor_it_replaced(rename):
    ref = build_chain()
    cand = _qdq(0.05, rename)
    loc = localize(ref, cand, _feeds(ref))
    first = loc.nodes[0]
    assert first.op_type == "DequantizeLinear" and first.node == "dq"
    assert first.matched_by == "dequantize" and first.reference == "ra"
    assert first.output == ("ra" if rename else "ra_dq")
    assert 1e-3 < first.added < 0.05
    # Q and DQ (the int8 tensor between them is not comparable), and the Relu when its output
    # has a new name.
    assert first.span == (3 if rename else 2)
    # The Conv after it reads the reference's value in the cut run and is the reference's own
    # Conv: not ranked, like every node the candidate kept as it was.
    assert all(n.output != "b" for n in loc.nodes)
    assert loc.unchanged == (4 if rename else 5)
    if rename:
        assert loc.skipped["not in the reference"] == 1  # ra_f
    assert loc.skipped["not a float tensor"] == 1  # ra_q


def test_candidate_from_optimize_reports_only_comparable_tensors(conv_bn_model):
    ref = conv_bn_model
    cand = onnxshrink.optimize(ref).model
    loc = localize(ref, cand, [generate_inputs(ref, seed=s) for s in range(2)])
    assert loc.reason is None
    ref_tensors = {o for n in ref.graph.node if n.op_type != "Constant" for o in n.output}
    cand_tensors = {o for n in cand.graph.node for o in n.output}
    assert loc.nodes and all(n.output in ref_tensors & cand_tensors for n in loc.nodes)
    assert loc.compared == len(loc.nodes)
    assert all(n.error < 1e-4 and n.added < 1e-4 for n in loc.nodes)


def test_subgraph_tensors_are_skipped():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[2, 3] x, bool c) => (float[2, 3] y) {
        a = Relu (x)
        y = If (c) <
            then_branch = t () => (float[2, 3] o) { o = Sigmoid (a) },
            else_branch = e () => (float[2, 3] o2) { o2 = Tanh (a) }
        >
    }
    """
    ref = make_model(text)
    loc = localize(ref, ref, [{"x": np.ones((2, 3), np.float32), "c": np.array(True)}])
    assert loc.skipped["inside a subgraph"] == 2
    # The If is ranked (its branches are not compared); the Relu is the reference's own.
    assert {n.output for n in loc.nodes} == {"y"} and loc.unchanged == 1


def test_nothing_comparable_says_why():
    ref = build_chain()
    cand = onnx.ModelProto()
    cand.CopyFrom(ref)
    for node in cand.graph.node:
        for k, name in enumerate(node.output):
            node.output[k] = f"{name}_renamed" if name != "y" else name
        for k, name in enumerate(node.input):
            if name in {"a", "ra", "b", "rb", "b1", "b2"}:
                node.input[k] = f"{name}_renamed"
    loc = localize(ref, cand, _feeds(ref, 1))
    assert loc.compared == 1 and loc.nodes[0].output == "y"
    assert loc.skipped["not in the reference"] == 4
    graph_only = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[2] x) => (float[2] x2) { x2 = Identity (x) }
        """
    )
    other = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[2] x) => (float[2] x2) { z = Neg (x)
        x2 = Neg (z) }
        """
    )
    loc = localize(other, graph_only, [{"x": np.ones(2, np.float32)}])
    assert loc.compared == 1  # x2 only
    loc = localize(graph_only, make_model(_renamed_output()), [{"x": np.ones(2, np.float32)}])
    assert not loc.nodes and "no intermediate tensor" in loc.reason


def _renamed_output() -> str:
    return """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[2] x) => (float[2] q) { q = Identity (x) }
    """


_CONV_BN_RELU = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {{
    a = Conv <pads = [1, 1, 1, 1]> (x, w{bias})
    {bn}
    y = Relu ({relu_in})
}}
"""


def test_a_reused_name_is_matched_by_value():
    """Folding BN into the Conv keeps the Conv's output name `a` for the BN's value."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    ref = make_model(
        _CONV_BN_RELU.format(
            bias="", bn="bn = BatchNormalization (a, gamma, beta, mean, var)", relu_in="bn"
        ),
        {
            k: np.asarray(v, np.float32)
            for k, v in dict(w=w, gamma=gamma, beta=beta, mean=mean, var=var).items()
        },
    )
    scale = gamma / np.sqrt(var + 1e-5)
    folded = {
        "w": (w * scale[:, None, None, None]).astype(np.float32),
        "b": (beta - mean * scale).astype(np.float32),
    }
    cand = make_model(_CONV_BN_RELU.format(bias=", b", bn="", relu_in="a"), folded)
    loc = localize(ref, cand, _feeds(ref))
    a = next(n for n in loc.nodes if n.output == "a")
    assert (a.reference, a.matched_by) == ("bn", "value") and loc.rematched == 1
    assert all(n.error < 1e-5 and n.added < 1e-5 for n in loc.nodes)
    # A real error on top (a 5% weight scale) is still matched to its twin, and its error
    # against the twin is what is reported, not hidden; its consumer reads the twin's value in
    # the cut run, so the blame stays with the Conv.
    broken = perturbed(cand, "w", 1.05)
    loc = localize(ref, broken, _feeds(ref))
    a = next(n for n in loc.nodes if n.output == "a")
    assert loc.rematched == 1 and (a.reference, a.matched_by) == ("bn", "value")
    assert a.added == pytest.approx(0.05, rel=0.1) and a.error == pytest.approx(a.added)
    assert [n.output for n in loc.nodes] == ["a"] and loc.unchanged == 1


def test_a_quantized_tensor_under_a_reused_name_is_matched_by_value():
    """An int8 model of an optimized model: the folded Conv's output `a` (the BN's value, under
    the Conv's name) is quantized. Paired by name with the reference's pre-BN `a`, the cut run
    would feed the Relu that wrong value and rank it first with a huge "added"; matched by
    value, the DequantizeLinear (the rounding) is what is ranked, and the Relu, the
    reference's own, is not."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.2, 0.5, 4), rng.normal(size=4) + 3
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    ref = make_model(
        _CONV_BN_RELU.format(
            bias="", bn="bn = BatchNormalization (a, gamma, beta, mean, var)", relu_in="bn"
        ),
        {
            k: np.asarray(v, np.float32)
            for k, v in dict(w=w, gamma=gamma, beta=beta, mean=mean, var=var).items()
        },
    )
    scale = gamma / np.sqrt(var + 1e-5)
    quantized = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        aq = QuantizeLinear (a, s, zp)
        adq = DequantizeLinear (aq, s, zp)
        y = Relu (adq)
    }
    """
    cand = make_model(
        quantized,
        {
            "w": (w * scale[:, None, None, None]).astype(np.float32),
            "b": (beta - mean * scale).astype(np.float32),
            "s": np.array(0.05, np.float32),
            "zp": np.array(0, np.int8),
        },
    )
    loc = localize(ref, cand, _feeds(ref))
    assert loc.rematched >= 1
    dq = next(n for n in loc.nodes if n.output == "adq")
    assert (dq.reference, dq.matched_by) == ("bn", "value")
    # The rounding (and clipping at 127 * 0.05) of the quantized tensor is the largest error.
    assert max(n.added for n in loc.nodes) == dq.added < 0.2
    assert all(n.output != "y" for n in loc.nodes) and loc.unchanged == 1


def _quantized_input_folded_conv(scale: float) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(reference Conv -> BN -> Relu, candidate Q/DQ(x) -> folded Conv -> Relu).

    The candidate's folded Conv keeps the name `a` for the BN's value, and its input is
    quantized with `scale`: upstream error reaches `a`, as deep in an int8 network, so `a` is
    near its twin `bn` only within that error (a noise-to-signal ratio of a few 1e-2)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    ref = make_model(
        _CONV_BN_RELU.format(
            bias="", bn="bn = BatchNormalization (a, gamma, beta, mean, var)", relu_in="bn"
        ),
        {
            k: np.asarray(v, np.float32)
            for k, v in dict(w=w, gamma=gamma, beta=beta, mean=mean, var=var).items()
        },
    )
    factor = gamma / np.sqrt(var + 1e-5)
    quantized = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        xq = QuantizeLinear (x, s, zp)
        xdq = DequantizeLinear (xq, s, zp)
        a = Conv <pads = [1, 1, 1, 1]> (xdq, w, b)
        y = Relu (a)
    }
    """
    cand = make_model(
        quantized,
        {
            "w": (w * factor[:, None, None, None]).astype(np.float32),
            "b": (beta - mean * factor).astype(np.float32),
            "s": np.array(scale, np.float32),
            "zp": np.array(0, np.int8),
        },
    )
    return ref, cand


def test_a_reused_name_downstream_of_quantized_layers_is_matched_by_value():
    """Deep in an int8 network a folded Conv's output carries the error of every quantized
    layer before it. It must still be compared with (and its consumers fed) the value it
    computes, not the pre-fold value of its name: else the cut run feeds the Relu the
    unfolded tensor and its "added" is far above both its "error" and its inputs' error."""
    ref, cand = _quantized_input_folded_conv(0.3)
    feeds = _feeds(ref)
    loc = localize(ref, cand, feeds)
    a = next(n for n in loc.nodes if n.output == "a")
    assert (a.reference, a.matched_by) == ("bn", "value") and loc.rematched == 1
    # The Relu reads `a`, compared with `bn`: it is the reference's own Relu, not ranked.
    assert all(n.output != "y" for n in loc.nodes) and loc.unchanged == 1
    # What the cut run feeds a node is the reference's value of its inputs, so no node adds
    # much more than the error it shows in the plain run.
    assert all(n.added <= 1.5 * n.error + 1e-6 for n in loc.nodes)


def test_a_few_clipped_outliers_do_not_outrank_a_layer_wide_error():
    """Clipping one outlier in 100,000 puts a node's max relative error near 1 but its noise-to-
    signal ratio near 0.0025; a scale off by 10% on every element is NSR 0.01. The second is
    the layer that hurts, and ranks first (module docstring, 4)."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[1, 100000] x) => (float[1, 100000] y) {
        t = %s
        y = Mul (t, k)
    }
    """
    reference = make_model(
        text % "Mul (x, one)", {"one": np.ones(1, np.float32), "k": np.ones(1, np.float32)}
    )
    candidate = make_model(
        text % "Clip (x, lo, hi)",
        {
            "lo": np.array(-4.0, np.float32),
            "hi": np.array(4.0, np.float32),
            "k": np.full(1, 1.1, np.float32),
        },
    )
    x = np.random.default_rng(0).normal(size=(1, 100000)).astype(np.float32)
    x[0, 0] = 20.0
    loc = localize(reference, candidate, [{"x": x}])
    assert loc.reason is None
    first, second = loc.nodes[0], loc.nodes[1]
    assert (first.op_type, second.op_type) == ("Mul", "Clip")
    # the max-based figure alone would have put the Clip first
    assert second.added > 0.5 > first.added
    assert first.added_nsr == pytest.approx(0.01, rel=0.05)
    assert second.added_nsr < 0.005
