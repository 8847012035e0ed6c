"""The error figure of lossy stages (onnxshrink.verify.measure): per channel group, worst output."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxshrink.verify.measure import (
    OutputNoise,
    channel_axes,
    grouped_nsr,
    looks_like_distribution,
    model_error,
)


def _pooled(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    noise = sum(float(np.sum((c - r) ** 2)) for r, c in zip(ref, cand, strict=True))
    return noise / sum(float(np.sum(r**2)) for r in ref)


def _mixed_head(rng: np.random.Generator, n: int = 4) -> np.ndarray:
    """[n, 50, 4 + 6]: box coordinates in [0, 320] then class scores in [0, 1] (last axis)."""
    boxes = rng.uniform(0, 320, (n, 50, 4))
    scores = rng.uniform(0, 1, (n, 50, 6))
    return np.concatenate([boxes, scores], axis=-1).astype(np.float32)


def test_one_scale_output_is_its_pooled_nsr() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.normal(0, 1, (2, 16, 8, 8)).astype(np.float32) for _ in range(3)]
    cand = [r + rng.normal(0, 0.05, r.shape).astype(np.float32) for r in ref]
    got = model_error([[r] for r in ref], [[c] for c in cand])
    assert got == pytest.approx(_pooled(ref, cand), rel=1e-5)
    assert model_error([[r] for r in ref], [[r] for r in ref]) == 0.0


def test_collapsed_small_head_fails_where_pooled_passes() -> None:
    """The issue's detector: scores fall 3x, boxes intact; pooled NSR hides it."""
    rng = np.random.default_rng(1)
    ref = [_mixed_head(rng) for _ in range(2)]
    cand = []
    for r in ref:
        c = r.copy()
        c[..., 4:] *= 0.33
        cand.append(c)
    pooled = _pooled(ref, cand)
    assert pooled < 1e-3  # what the old single figure saw: well within a 0.01 budget
    got = model_error([[r] for r in ref], [[c] for c in cand])
    assert got > 0.3  # the score group's own NSR, (1 - 0.33)^2
    assert got == pytest.approx(0.67**2, rel=1e-3)


def test_same_head_along_axis_1_is_found_too() -> None:
    """[N, 4 + classes, anchors] layout: the channel axis is 1."""
    rng = np.random.default_rng(2)
    ref = [np.swapaxes(_mixed_head(rng), 1, 2).copy()]
    cand = [ref[0].copy()]
    cand[0][:, 4:, :] += rng.normal(0, 0.3, cand[0][:, 4:, :].shape).astype(np.float32)
    assert _pooled(ref, cand) < 1e-3
    assert model_error([ref], [cand]) > 0.1


def test_probability_output_is_judged_pooled() -> None:
    """A softmax over classes is one quantity: rare classes are not a "small part"."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (4, 20, 30))
    logits[..., 10:] -= 12.0  # 20 classes that are never likely
    ref = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    noisy = ref + rng.normal(0, 1e-3, ref.shape)
    assert looks_like_distribution(ref.astype(np.float32))
    assert not looks_like_distribution(noisy - 0.5)
    got = model_error([[ref]], [[noisy]])
    assert got == pytest.approx(_pooled([ref], [noisy]), rel=1e-9)


def test_spatial_axes_are_never_channels() -> None:
    """A probability map with empty margins: margins must not form a group of their own."""
    rng = np.random.default_rng(4)
    ref = np.full((1, 1, 32, 32), 1e-4, np.float32)
    ref[..., 8:24, 8:24] = 0.9
    cand = ref + rng.normal(0, 1e-3, ref.shape).astype(np.float32)
    assert channel_axes(4) == (1,)
    assert model_error([[ref]], [[cand]]) == pytest.approx(_pooled([ref], [cand]), rel=1e-5)


def test_continuum_of_scales_is_one_group() -> None:
    scales = np.geomspace(0.01, 10.0, 64)  # neighbours within 12%: no gap anywhere
    noise = np.full(64, 1e-4)
    signal = scales**2
    assert grouped_nsr(noise, signal) == pytest.approx(noise.sum() / signal.sum())
    two = np.concatenate([np.full(8, 1e4), np.full(8, 1.0)])
    assert grouped_nsr(np.full(16, 1.0), two) == pytest.approx(8.0 / 8.0)


def test_dynamic_axis_is_dropped_and_mismatch_is_inf() -> None:
    rng = np.random.default_rng(5)
    noise = OutputNoise()
    a = rng.normal(0, 1, (1, 5, 4))
    b = rng.normal(0, 1, (1, 7, 4))
    noise.update(a, a * 1.01)
    noise.update(b, b * 1.01)
    assert noise.slices[1] is None and noise.slices[2] is not None
    assert noise.value() == pytest.approx(1e-4, rel=1e-6)
    assert model_error([[np.zeros(3)]], [[np.ones(3)]]) == math.inf
    assert model_error([[np.zeros(3)]], [[np.zeros(3)]]) == 0.0
    assert model_error([[np.zeros(3)]], [[np.zeros(4)]]) == math.inf


def test_worst_output_counts() -> None:
    rng = np.random.default_rng(6)
    good = rng.normal(0, 1, (2, 8))
    bad = rng.normal(0, 1, (2, 8))
    ref = [[good, bad]]
    cand = [[good * 1.001, bad * 1.1]]
    assert model_error(ref, cand) == pytest.approx(0.01, rel=1e-6)
    assert model_error(ref, cand, outputs=[0]) == pytest.approx(1e-6, rel=1e-3)


def test_mask_leaves_padded_positions_out() -> None:
    rng = np.random.default_rng(7)
    ref = rng.normal(0, 1, (2, 6, 4)).astype(np.float32)
    cand = ref + rng.normal(0, 0.01, ref.shape).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], np.int64)
    cand[mask == 0] += 50.0  # padded positions: garbage the users never read
    noise = OutputNoise(cosine=True)
    noise.update(ref, cand, mask)
    kept = mask != 0
    assert noise.value() == pytest.approx(_pooled([ref[kept]], [cand[kept]]), rel=1e-6)
    assert noise.value() < 1e-3 and noise.cosine() > 0.999
    assert model_error([[ref]], [[cand]]) > 10  # unmasked, the padding dominates
    assert model_error([[ref]], [[cand]], masks=[mask]) == pytest.approx(noise.value())
    other = OutputNoise()
    other.update(ref[:, :, 0], cand[:, :, 0], mask[:1])  # leading dims do not match: ignored
    assert other.value() > 10


def test_mask_input_finds_the_convention_or_the_users_choice() -> None:
    from onnx import TensorProto, helper

    from onnxshrink.errors import UsageError
    from onnxshrink.verify.measure import mask_input

    def model(*inputs):
        values = [helper.make_tensor_value_info(n, t, [1, 4]) for n, t in inputs]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        node = helper.make_node("Identity", [inputs[0][0]], ["y"])
        return helper.make_model(helper.make_graph([node], "g", values, [out]))

    bert = model(("input_ids", TensorProto.INT64), ("attention_mask", TensorProto.INT64))
    assert mask_input(bert) == "attention_mask"
    assert mask_input(bert, "none") is None
    assert mask_input(bert, "input_ids") == "input_ids"
    with pytest.raises(UsageError, match="--mask-input 'nope'"):
        mask_input(bert, "nope")
    cnn = model(("x", TensorProto.FLOAT))
    assert mask_input(cnn) is None
    with pytest.raises(UsageError, match="not an integer input"):
        mask_input(cnn, "x")
    floating = model(("x", TensorProto.FLOAT), ("attention_mask", TensorProto.FLOAT))
    assert mask_input(floating) is None
