"""Transformer channel groups (`onnxshrink.rules.channels_transformer`) and `--sparsify` specs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.errors import UsageError
from onnxshrink.quant.sparsity import ChannelGroup, SparsifySpec
from onnxshrink.rules import channels_transformer
from tests.helpers import make_model, run

C, H, D, F = 32, 4, 8, 64


def encoder_block(
    *, head_shape: tuple[int, ...] = (0, 0, -1, D), ffn_out: bool = False
) -> onnx.ModelProto:
    """One BERT-style block: attention (Q, K, V, O with biases, a [B, 1, 1, S] mask) and an
    FFN with a decomposed GELU, residuals and LayerNorms; `ffn_out` also makes the FFN's
    activation a graph output."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    extra_out = ", float[B, S, 64] act" if ffn_out else ""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    block (float[B, S, {C}] x, float[B, 1, 1, S] mask) => (float[B, S, {C}] y{extra_out}) {{
        q0 = MatMul(x, wq)
        q = Add(q0, bq)
        k0 = MatMul(x, wk)
        k = Add(k0, bk)
        v0 = MatMul(x, wv)
        v = Add(v0, bv)
        qr = Reshape(q, heads)
        kr = Reshape(k, heads)
        vr = Reshape(v, heads)
        qt = Transpose<perm = [0, 2, 1, 3]>(qr)
        kt = Transpose<perm = [0, 2, 3, 1]>(kr)
        vt = Transpose<perm = [0, 2, 1, 3]>(vr)
        s0 = MatMul(qt, kt)
        s1 = Mul(s0, scale)
        s2 = Add(s1, mask)
        p = Softmax<axis = -1>(s2)
        ctx = MatMul(p, vt)
        ct = Transpose<perm = [0, 2, 1, 3]>(ctx)
        cm = Reshape(ct, merge)
        o0 = MatMul(cm, wo)
        o = Add(o0, bo)
        r1 = Add(o, x)
        n1 = LayerNormalization<axis = -1>(r1, g1, b1)
        f0 = MatMul(n1, w1)
        f1 = Add(f0, c1)
        e0 = Div(f1, sqrt2)
        e1 = Erf(e0)
        e2 = Add(e1, one)
        e3 = Mul(f1, e2)
        act = Mul(e3, half)
        f2 = MatMul(act, w2)
        f3 = Add(f2, c2)
        r2 = Add(f3, n1)
        y = LayerNormalization<axis = -1>(r2, g2, b2)
    }}
    """
    inits = {
        "wq": w(C, C), "bq": w(C), "wk": w(C, C), "bk": w(C), "wv": w(C, C), "bv": w(C),
        "wo": w(C, C), "bo": w(C), "w1": w(C, F), "c1": w(F), "w2": w(F, C), "c2": w(C),
        "g1": np.ones(C, np.float32), "b1": np.zeros(C, np.float32),
        "g2": np.ones(C, np.float32), "b2": np.zeros(C, np.float32),
        "heads": np.array(head_shape, np.int64), "merge": np.array([0, 0, -1], np.int64),
        "scale": np.float32(1 / np.sqrt(D)), "sqrt2": np.float32(np.sqrt(2)),
        "one": np.float32(1), "half": np.float32(0.5),
    }  # fmt: skip
    return make_model(text, inits)


def _by_op(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.op: g for g in groups}


def _prune(model: onnx.ModelProto, groups: list[ChannelGroup], drop: int) -> onnx.ModelProto:
    """`model` with the last `drop` channels of every group sliced off."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for group in groups:
        keep = np.arange(group.width - drop)
        for s in [*group.producers, *(c.weight for c in group.consumers)]:
            idx = (s.offset + keep[:, None] * s.per_channel + np.arange(s.per_channel)).ravel()
            value = np.take(onnx.numpy_helper.to_array(inits[s.tensor]), idx, axis=s.axis)
            inits[s.tensor].CopyFrom(onnx.numpy_helper.from_array(value, s.tensor))
        for tensor, index, per in group.shapes:
            value = onnx.numpy_helper.to_array(inits[tensor]).copy()
            value[index] = len(keep) * per
            inits[tensor].CopyFrom(onnx.numpy_helper.from_array(value, tensor))
    return out


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((2, 5, C)).astype(np.float32),
        "mask": np.zeros((2, 1, 1, 5), np.float32),
    }


def test_finds_heads_and_ffn_neurons() -> None:
    groups, declined = channels_transformer.channel_groups(encoder_block())
    assert declined == {}
    found = _by_op(groups)
    assert set(found) == {"attention heads", "FFN neurons"}
    heads, ffn = found["attention heads"], found["FFN neurons"]
    assert (heads.width, ffn.width) == (H, F)
    # Q, K, V weights and biases, by head of D columns; O's rows the consumer
    assert {(s.tensor, s.axis, s.per_channel) for s in heads.producers} == {
        (n, a, D) for n, a in [("wq", 1), ("bq", 0), ("wk", 1), ("bk", 0), ("wv", 1), ("bv", 0)]
    }
    assert [(c.weight.tensor, c.weight.axis, c.weight.per_channel) for c in heads.consumers] == [
        ("wo", 0, D)
    ]
    assert heads.shapes == []  # the split spells -1, not H
    assert {(s.tensor, s.axis) for s in ffn.producers} == {("w1", 1), ("c1", 0)}
    assert [c.weight.tensor for c in ffn.consumers] == ["w2"]
    assert ffn.activations == ["act"]


def test_pruned_groups_run_with_the_same_outputs_shape() -> None:
    model = encoder_block()
    groups, _ = channels_transformer.channel_groups(model)
    pruned = _prune(model, groups, drop=1)
    onnx.checker.check_model(pruned, full_check=True)
    (before,) = run(model, _feeds())
    (after,) = run(pruned, _feeds())
    assert after.shape == before.shape
    inits = {t.name: t for t in pruned.graph.initializer}
    assert list(inits["wq"].dims) == [C, C - D] and list(inits["w1"].dims) == [C, F - 1]


def test_an_explicit_head_count_is_listed_to_be_rewritten() -> None:
    model = encoder_block(head_shape=(0, 0, H, D))
    groups, _ = channels_transformer.channel_groups(model)
    heads = _by_op(groups)["attention heads"]
    assert heads.shapes == [("heads", 2, 1)]
    (after,) = run(_prune(model, groups, drop=1), _feeds())
    assert after.shape == (2, 5, C)


def test_ffn_activation_read_as_a_graph_output_is_not_a_group() -> None:
    groups, _ = channels_transformer.channel_groups(encoder_block(ffn_out=True))
    assert "FFN neurons" not in _by_op(groups)
    assert "attention heads" in _by_op(groups)


def test_a_lone_linear_layer_is_not_a_group() -> None:
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        lone (float[2, 16] x) => (float[2, 16] y) {
            h = MatMul(x, w)
            y = Relu(h)
        }
        """,
        {"w": np.ones((16, 16), np.float32)},
    )
    assert channels_transformer.channel_groups(model) == ([], {})


def test_heads_whose_context_is_not_projected_are_declined() -> None:
    """Heads merged back and then read by something other than a linear layer: declined."""
    model = encoder_block()
    for node in model.graph.node:
        if node.output[0] == "o0":
            node.op_type, node.input[1] = "Add", "cm"  # O is now cm + cm
    groups, declined = channels_transformer.channel_groups(model)
    assert "attention heads" not in _by_op(groups)
    assert any("merged heads read by Add" in reason for reason in declined.values())


@pytest.mark.parametrize(
    ("text", "kind", "ratio", "nm"),
    [
        ("unstructured:0.5", "unstructured", 0.5, (0, 0)),
        ("channels:0.25", "channels", 0.25, (0, 0)),
        ("2:4", "n:m", 0.0, (2, 4)),
        ("1:8", "n:m", 0.0, (1, 8)),
        (" Channels:0.3 ", "channels", 0.3, (0, 0)),
    ],
)
def test_spec_parses(text: str, kind: str, ratio: float, nm: tuple[int, int]) -> None:
    spec = SparsifySpec.parse(text)
    assert (spec.kind, spec.ratio, (spec.n, spec.m)) == (kind, ratio, nm)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("unstructured:1.5", "must be in (0, 1)"),
        ("channels:0", "must be in (0, 1)"),
        ("channels:nan", "must be in (0, 1)"),
        ("channels:x", "not a number"),
        ("4:2", "0 < N < M"),
        ("2:2", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("unstructured", "give the share"),
        ("blocks:0.5", "expected unstructured:R"),
    ],
)
def test_bad_specs_get_one_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match="--sparsify") as info:
        SparsifySpec.parse(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_stage_prunes_the_block_and_lists_only_its_own_declines() -> None:
    """Through the channels stage: both groups pruned, outputs keep their shape, and nodes the
    transformer finder grouped are not listed as declined by the conv finder."""
    from onnxshrink.engine.io import named_copy
    from onnxshrink.quant.lossy import StageSettings
    from onnxshrink.rules import prune_channels

    model = named_copy(encoder_block())
    rng = np.random.default_rng(2)
    feeds = [
        {
            "x": rng.standard_normal((4, 6, C)).astype(np.float32),
            "mask": np.zeros((4, 1, 1, 6), np.float32),
        }
        for _ in range(4)
    ]
    settings = StageSettings(max_error=10.0, sparsity=SparsifySpec.parse("channels:0.25"))
    result = prune_channels.STAGE.run(model, feeds, settings)
    assert {layer.precision for layer in result.quantized} == {"pruned"}
    assert len(result.quantized) == 2  # the heads and the FFN neurons
    assert result.kept_float == []  # no other finder's declines of grouped nodes
    (before,) = run(model, feeds[0])
    (after,) = run(result.model, feeds[0])
    assert after.shape == before.shape
    onnx.checker.check_model(result.model, full_check=True)
