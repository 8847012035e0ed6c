"""Parity figures agree with a direct numpy computation; generated inputs are runnable."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.errors import UsageError
from onnxshrink.parity import check_parity, compare_outputs, generate_inputs, load_inputs
from tests.helpers import make_model


def test_compare_outputs_matches_numpy():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4, 5)).astype(np.float32)
    cand = ref + rng.normal(scale=1e-3, size=ref.shape).astype(np.float32)
    got = compare_outputs("y", ref, cand, rtol=1e-4)
    expected_abs = np.max(np.abs(cand.astype(np.float64) - ref))
    assert got.max_abs == pytest.approx(expected_abs)
    assert got.max_rel == pytest.approx(expected_abs / np.max(np.abs(ref)))
    assert not got.ok
    assert compare_outputs("y", ref, cand, rtol=1e-1).ok


def test_compare_outputs_exact_for_integers_and_shapes():
    assert compare_outputs("i", np.array([1, 2]), np.array([1, 2]), 1e-4).ok
    assert not compare_outputs("i", np.array([1, 2]), np.array([1, 3]), 1e-4).ok
    assert not compare_outputs("y", np.zeros((2, 2)), np.zeros((2, 3)), 1e-4).ok
    nan = np.array([np.nan, 1.0])
    assert compare_outputs("y", nan, nan.copy(), 1e-4).ok
    assert not compare_outputs("y", nan, np.array([0.0, 1.0]), 1e-4).ok


def test_generate_inputs_respects_shapes_and_embedding_bounds():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (int64[batch, seq] ids, int64[batch, seq] mask, float[batch, 3, h, w] img) => (float[batch, seq, 4] e, float[batch, 3, h, w] o) {
            e = Gather (table, ids)
            o = Identity (img)
        }
        """,
        {"table": np.zeros((7, 4), np.float32)},
    )
    feeds = generate_inputs(model, {"img": [2, 3, 16, 8]}, seed=3)
    assert feeds["img"].shape == (2, 3, 16, 8) and feeds["img"].dtype == np.float32
    assert feeds["ids"].shape == (1, 32) and feeds["ids"].max() < 7
    assert set(np.unique(feeds["mask"])) <= {0, 1}


def test_check_parity_detects_a_changed_weight(conv_bn_model):
    feeds = [generate_inputs(conv_bn_model, seed=s) for s in range(2)]
    same = check_parity(conv_bn_model, conv_bn_model, feeds)
    assert same.verified and same.passed and same.samples == 2
    changed = onnx.ModelProto()
    changed.CopyFrom(conv_bn_model)
    gamma = next(t for t in changed.graph.initializer if t.name == "gamma")
    values = onnx.numpy_helper.to_array(gamma).copy()
    values[0] *= 1.01
    gamma.CopyFrom(onnx.numpy_helper.from_array(values, "gamma"))
    report = check_parity(conv_bn_model, changed, feeds)
    assert report.verified and not report.passed
    assert report.outputs[0].max_rel > 1e-4
    assert report.samples == 2
    early = check_parity(conv_bn_model, changed, feeds, stop_on_failure=True)
    assert not early.passed and early.samples == 1


def test_check_parity_reports_unrunnable_model_instead_of_raising(conv_bn_model):
    custom = onnx.ModelProto()
    custom.CopyFrom(conv_bn_model)
    custom.graph.node[1].domain = "com.example"
    custom.opset_import.add(domain="com.example", version=1)
    report = check_parity(conv_bn_model, custom, [generate_inputs(conv_bn_model)])
    assert not report.verified
    assert "cannot load the optimized model" in report.reason


def test_load_inputs_from_file_and_folder(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 2), np.float32))
    np.savez(tmp_path / "b.npz", x=np.ones((1, 2), np.float32))
    assert len(list(load_inputs(tmp_path, ["x"]))) == 2
    assert list(load_inputs(tmp_path / "a.npz", ["x"]))[0]["x"].shape == (1, 2)
    with pytest.raises(UsageError, match="no array for model input"):
        list(load_inputs(tmp_path / "a.npz", ["y"]))
    with pytest.raises(UsageError, match="no such file"):
        list(load_inputs(tmp_path / "none.npz", ["x"]))


def test_reference_outputs_are_computed_once_per_feed(conv_bn_model, monkeypatch):
    from onnxshrink.parity import Reference

    feeds = [generate_inputs(conv_bn_model, seed=s) for s in range(3)]
    reference = Reference(conv_bn_model)
    calls = []
    original_run = Reference.run

    def counting_run(self, index, feed):
        if index not in self._cache:
            calls.append(index)
        return original_run(self, index, feed)

    monkeypatch.setattr(Reference, "run", counting_run)
    for _ in range(2):
        report = check_parity(reference, conv_bn_model, feeds)
        assert report.passed and report.samples == 3
    assert calls == [0, 1, 2]
    # With no room in the cache, outputs are recomputed instead of piling up.
    tight = Reference(conv_bn_model, cache_bytes=0)
    check_parity(tight, conv_bn_model, feeds)
    assert not tight._cache
