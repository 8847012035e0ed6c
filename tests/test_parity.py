"""Parity figures agree with a direct numpy computation; generated inputs are runnable."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.errors import TimeLimitError, UsageError
from onnxshrink.verify.parity import (
    DEFAULT_RTOL,
    InputBatches,
    OutputStats,
    check_parity,
    compare_outputs,
    criteria_from_specs,
    declared_batches,
    feed_samples,
    generate_inputs,
    load_inputs,
    ort_session,
    parse_input_ranges,
    plan_batches,
    relative_error,
    run_with_limit,
    split_feed,
)
from tests.helpers import endless_loop_model, make_model


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
    from onnxshrink.verify.parity import Reference

    feeds = [generate_inputs(conv_bn_model, seed=s) for s in range(3)]
    reference = Reference(conv_bn_model)
    calls = []
    original_run = Reference.run

    def counting_run(self, index, feed, *limit):
        if index not in self._cache:
            calls.append(index)
        return original_run(self, index, feed, *limit)

    monkeypatch.setattr(Reference, "run", counting_run)
    for _ in range(2):
        report = check_parity(reference, conv_bn_model, feeds)
        assert report.passed and report.samples == 3
    assert calls == [0, 1, 2]
    # With no room in the cache, outputs are recomputed instead of piling up.
    tight = Reference(conv_bn_model, cache_bytes=0)
    check_parity(tight, conv_bn_model, feeds)
    assert not tight._cache


# --- figures against an independent numpy computation ---------------------------------------


def _two_runs(seed: int = 2, noise: float = 1e-2):
    rng = np.random.default_rng(seed)
    refs = [rng.normal(size=(15, 7)).astype(np.float32) for _ in range(2)]  # [N, C] scores
    cands = [
        (r + rng.normal(scale=noise, size=r.shape)).astype(np.float32) * np.float32(1 + i)
        for i, r in enumerate(refs)
    ]
    return refs, cands


def test_output_stats_figures_match_numpy():
    refs, cands = _two_runs(noise=0.5)
    stats = OutputStats("y", rtol=1e-4, atol=1e-6)
    for r, c in zip(refs, cands, strict=True):
        stats.update(r, c)
    got = stats.result()
    r = np.concatenate([x.ravel() for x in refs]).astype(np.float64)
    c = np.concatenate([x.ravel() for x in cands]).astype(np.float64)
    d = c - r
    assert got.max_abs == pytest.approx(np.abs(d).max())
    assert got.mean_abs == pytest.approx(np.abs(d).mean())
    assert got.cosine == pytest.approx(r @ c / np.sqrt((r @ r) * (c @ c)))
    assert got.snr_db == pytest.approx(10 * np.log10((r @ r) / (d @ d)))
    # max rel: the worst run against its own scale
    per_run = [
        np.abs(ci.astype(np.float64) - ri).max() / np.abs(ri).max()
        for ri, ci in zip(refs, cands, strict=True)
    ]
    assert got.max_rel == pytest.approx(max(per_run))
    agree = np.concatenate(
        [(ri.argmax(-1) == ci.argmax(-1)).ravel() for ri, ci in zip(refs, cands, strict=True)]
    )
    assert got.argmax_agreement == pytest.approx(agree.mean())
    assert 0 < got.argmax_agreement < 1
    assert got.runs == 2 and got.elements == r.size
    assert not got.ok and "max abs error" in got.reason


def test_identical_outputs_give_perfect_figures():
    ref = np.random.default_rng(0).normal(size=(2, 10)).astype(np.float32)
    got = compare_outputs("y", ref, ref.copy(), rtol=0.0, atol=0.0)
    assert got.ok and got.max_abs == 0.0 and got.cosine == 1.0
    assert got.snr_db == float("inf") and got.argmax_agreement == 1.0


def test_argmax_only_for_class_like_outputs():
    assert compare_outputs("v", np.ones(5), np.ones(5), 1e-4).argmax_agreement is None
    assert compare_outputs("v", np.ones((5, 1)), np.ones((5, 1)), 1e-4).argmax_agreement is None
    ints = np.arange(6).reshape(2, 3)
    assert compare_outputs("i", ints, ints.copy(), 1e-4).argmax_agreement is None


@pytest.mark.parametrize("stat", ["mean", "median", "quantile"])
def test_error_stat_is_the_worst_runs_statistic(stat):
    refs, cands = _two_runs(seed=5)
    q = 0.9
    stats = OutputStats("y", rtol=1e-3, atol=0.0, error_stat=stat, error_quantile=q)
    for r, c in zip(refs, cands, strict=True):
        stats.update(r, c)
    got = stats.result()
    fn = {"mean": np.mean, "median": np.median, "quantile": lambda e: np.quantile(e, q)}[stat]
    values = [fn(np.abs(c.astype(np.float64) - r)) for r, c in zip(refs, cands, strict=True)]
    bounds = [1e-3 * np.abs(r).max() for r in refs]
    worst = int(np.argmax(np.array(values) - np.array(bounds)))
    assert got.error_stat_value == pytest.approx(values[worst])
    assert got.bound == pytest.approx(bounds[worst])
    assert got.ok == all(v <= b for v, b in zip(values, bounds, strict=True))
    assert got.error_stat == (f"q{q:g}" if stat == "quantile" else stat)


def test_median_passes_where_max_fails_for_a_few_outliers():
    ref = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100)
    cand = ref.copy()
    cand[0, :10] += 0.5  # 1% of the elements move a lot
    assert not compare_outputs("y", ref, cand, rtol=1e-3).ok
    stats = OutputStats("y", rtol=1e-3, error_stat="median")
    stats.update(ref, cand)
    assert stats.result().ok
    stats = OutputStats("y", rtol=1e-3, error_stat="quantile", error_quantile=0.995)
    stats.update(ref, cand)
    assert not stats.result().ok


def test_min_cosine():
    ref = np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32)
    cand = ref + np.float32(0.05) * np.random.default_rng(4).normal(size=ref.shape).astype(
        np.float32
    )
    loose = OutputStats("y", rtol=1.0, min_cosine=0.99)
    loose.update(ref, cand)
    assert loose.result().ok
    strict = OutputStats("y", rtol=1.0, min_cosine=0.9999)
    strict.update(ref, cand)
    result = strict.result()
    assert not result.ok and "cosine" in result.reason


def test_relative_error_fast_path_agrees_with_full_path():
    refs, cands = _two_runs(seed=9)
    for r, c in zip(refs, cands, strict=True):
        full = OutputStats("")
        full.update(r, c)
        assert relative_error(r, c) == pytest.approx((full.max_abs, full.max_rel))
    nan = np.array([np.nan, 1.0], np.float32)
    assert relative_error(nan, nan.copy()) == (0.0, 0.0)
    assert relative_error(nan, np.zeros(2, np.float32))[1] == float("inf")


# --- criteria --------------------------------------------------------------------------------


def test_criteria_from_specs_defaults_and_overrides():
    c = criteria_from_specs(["1e-5", "logits:1e-3"], ["a:b:0.5"], ["0.999", "y:0.9"])
    assert c.atol == 1e-5 and c.rtol == DEFAULT_RTOL and c.min_cosine == 0.999
    assert c.for_output("logits").atol == 1e-3 and c.for_output("logits").rtol == DEFAULT_RTOL
    assert c.for_output("a:b").rtol == 0.5  # names may hold colons: split at the last one
    assert c.for_output("y").min_cosine == 0.9 and c.for_output("z").min_cosine == 0.999
    c.check_outputs(["logits", "a:b", "y"])
    with pytest.raises(UsageError, match="'logits'"):
        c.check_outputs(["a:b", "y"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"atol": ["abc"]}, "bad --atol 'abc': not a number"),
        ({"atol": ["y:abc"]}, "bad --atol 'y:abc'"),
        ({"rtol": ["-1"]}, "must not be negative"),
        ({"rtol": [":1e-3"]}, "empty output name"),
        ({"min_cosine": ["1.5"]}, "a cosine lies in"),
        ({"error_stat": "p99"}, "bad error statistic"),
        ({"error_quantile": 1.5}, "--error-quantile"),
    ],
)
def test_criteria_from_specs_refuses_bad_specs(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        criteria_from_specs(**kwargs)


def test_check_parity_applies_per_output_overrides(conv_bn_model):
    changed = _scaled_gamma(conv_bn_model, 1.01)
    feeds = [generate_inputs(conv_bn_model, seed=s) for s in range(2)]
    assert not check_parity(conv_bn_model, changed, feeds).passed
    lenient = criteria_from_specs(rtol=["y:0.05"])
    report = check_parity(conv_bn_model, changed, feeds, criteria=lenient)
    assert report.passed and report.outputs[0].rtol == 0.05 and report.criteria is lenient
    seen = []
    check_parity(conv_bn_model, changed, feeds, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]


def _scaled_gamma(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    gamma = next(t for t in changed.graph.initializer if t.name == "gamma")
    values = onnx.numpy_helper.to_array(gamma).copy()
    values[0] *= factor
    gamma.CopyFrom(onnx.numpy_helper.from_array(values, "gamma"))
    return changed


def test_check_parity_matches_outputs_by_name():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[2,3] x) => ({outs}) {{
        a = Relu (x)
        b = Sigmoid (x)
    }}
    """
    ab = make_model(text.format(outs="float[2,3] a, float[2,3] b"))
    ba = make_model(text.format(outs="float[2,3] b, float[2,3] a"))
    report = check_parity(ab, ba, [generate_inputs(ab)])
    assert report.passed and [o.name for o in report.outputs] == ["a", "b"]
    only_a = make_model(text.format(outs="float[2,3] a"))
    report = check_parity(ab, only_a, [generate_inputs(ab)])
    assert not report.passed and "only the original has b" in report.reason


# --- inputs ----------------------------------------------------------------------------------

_RANGED = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[4, 100] x, int64[4, 100] ids, float[4, 100] z) => (float[4, 100] y) {
    y = Add (x, z)
}
"""


def test_generate_inputs_value_ranges():
    model = make_model(_RANGED)
    ranges = parse_input_ranges(["x:-1,1", "ids:5,9", "-3,-2"], model)
    feeds = generate_inputs(model, seed=1, ranges=ranges)
    assert -1 <= feeds["x"].min() < -0.8 and 0.8 < feeds["x"].max() < 1
    assert set(np.unique(feeds["ids"])) == {5, 6, 7, 8}
    assert feeds["z"].min() >= -3 and feeds["z"].max() < -2  # the default range, no name


@pytest.mark.parametrize(
    "spec, message",
    [
        ("x:1", "expected NAME:LOW,HIGH"),
        ("x:a,b", "expected NAME:LOW,HIGH"),
        ("x:1,0", "LOW must be below HIGH"),
        ("q:0,1", "'q' is not a model input"),
        ("ids:0.5,3", "bounds must be integers"),
    ],
)
def test_parse_input_ranges_refuses_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_input_ranges([spec], make_model(_RANGED))


def test_plan_batches_rules():
    fixed2 = {"x": (2, 2)}
    dynamic = {"x": (2, None)}
    assert plan_batches({"x": (6, 3)}, fixed2) == [(0, 2), (2, 4), (4, 6)]
    assert plan_batches({"x": (6, 3)}, dynamic) == [(0, 6)]
    assert plan_batches({"x": (6, 3)}, dynamic, batch=4) == [(0, 4), (4, 6)]
    # a scalar beside the batch goes to every run
    assert plan_batches({"x": (6, 3), "sr": ()}, {**fixed2, "sr": (0, None)}) == [
        (0, 2),
        (2, 4),
        (4, 6),
    ]
    # arrays of different lengths (a recurrent state beside the batch): the file is one run
    assert plan_batches({"x": (1, 3), "h": (2, 1, 8)}, {"x": (2, None), "h": (3, 2)}) is None
    with pytest.raises(UsageError, match="differ in length"):
        plan_batches({"x": (1, 3), "h": (2, 1, 8)}, {"x": (2, None), "h": (3, 2)}, batch=1)
    with pytest.raises(UsageError, match="do not split into the model's fixed batch of 2"):
        plan_batches({"x": (5, 3)}, fixed2)
    with pytest.raises(UsageError, match="fixed at 2"):
        plan_batches({"x": (6, 3)}, fixed2, batch=3)


def test_an_empty_axis_0_is_one_run_only_where_the_model_declares_it():
    """Case 5 of plan_batches: a model that takes string[0] (ONNX's StringSplit node test on
    an empty tensor) gets its empty array as one run; elsewhere 0 samples are refused, and a
    declared 0 beside real samples counts as a dynamic dim."""
    model = make_model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[0,3] x, float[?,3] d) => (float[0,3] y, float[?,3] e) { y = Neg(x)  e = Neg(d) }"""
    )
    declared = declared_batches(model)
    assert declared == {"x": (2, 0), "d": (2, None)}
    assert plan_batches({"x": (0, 3)}, declared) is None
    with pytest.raises(UsageError, match="0 samples"):
        plan_batches({"d": (0, 3)}, declared)
    assert plan_batches({"x": (4, 3)}, declared, max_batch=3) == [(0, 3), (3, 4)]


def test_input_batches_split_files_along_axis_0(tmp_path):
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[2, 3] x, float s) => (float[2, 3] y) {
            y = Mul (x, s)
        }
        """
    )
    x = np.arange(18, dtype=np.float32).reshape(6, 3)
    np.savez(tmp_path / "a.npz", x=x, s=np.float32(2))
    np.savez(tmp_path / "b.npz", x=x[:2], s=np.float32(3), extra=np.zeros(1))
    batches = InputBatches(tmp_path, model)
    assert batches.total == len(batches) == 4
    feeds = list(batches)
    assert [f["x"].shape for f in feeds] == [(2, 3)] * 4
    np.testing.assert_array_equal(feeds[1]["x"], x[2:4])
    assert [float(f["s"]) for f in feeds] == [2, 2, 2, 3]
    assert len(list(batches)) == 4  # iterating again reads the files again
    report = check_parity(model, model, batches)
    assert report.passed and report.samples == 4
    np.savez(tmp_path / "c.npz", y=x)
    with pytest.raises(UsageError, match="no array for model input"):
        InputBatches(tmp_path, model)
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable .npz"):
        InputBatches(tmp_path / "d.npz", model)


_DYNAMIC = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[N, 3] x, float s) => (float[N, 3] y) {
    y = Mul (x, s)
}
"""


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_input_batches_stream_rows_in_runs_of_max_batch(tmp_path, save):
    """A dynamic-batch model and a file of 20 samples: runs of at most 8, read row by row."""
    model = make_model(_DYNAMIC)
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    save(tmp_path / "a.npz", x=x, s=np.float32(2))
    batches = InputBatches(tmp_path / "a.npz", model, max_batch=8)
    assert len(batches) == 3 and batches.samples == 20
    feeds = list(batches)
    assert [f["x"].shape for f in feeds] == [(8, 3), (8, 3), (4, 3)]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    assert all(f["x"].flags.writeable and f["x"].flags.c_contiguous for f in feeds)
    assert [float(f["s"]) for f in feeds] == [2, 2, 2]
    assert len(list(InputBatches(tmp_path / "a.npz", model))) == 1  # no cap: one run of 20


def test_input_batches_fortran_order_and_truncated_member(tmp_path):
    model = make_model(_DYNAMIC)
    x = np.asfortranarray(np.arange(30, dtype=np.float32).reshape(10, 3))
    np.savez(tmp_path / "f.npz", x=x, s=np.float32(1))
    feeds = list(InputBatches(tmp_path / "f.npz", model, max_batch=4))
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    # a member whose data is shorter than its header says: one line, not a traceback
    import io
    import zipfile

    good = io.BytesIO()
    np.save(good, np.zeros((10, 3), np.float32))
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as archive:
        archive.writestr("x.npy", good.getvalue()[:-40])
        scalar = io.BytesIO()
        np.save(scalar, np.float32(1))
        archive.writestr("s.npy", scalar.getvalue())
    with pytest.raises(UsageError, match="not a readable .npz.*ends before row"):
        list(InputBatches(tmp_path / "t.npz", model, max_batch=4))


def test_split_feed_and_feed_samples():
    model = make_model(_DYNAMIC)
    declared = declared_batches(model)
    feed = {"x": np.zeros((10, 3), np.float32), "s": np.float32(1)}
    runs = list(split_feed(feed, declared, 4))
    assert [r["x"].shape[0] for r in runs] == [4, 4, 2]
    assert all(r["s"] is feed["s"] for r in runs)
    assert [feed_samples(r, declared) for r in runs] == [4, 4, 2]
    assert list(split_feed(feed, declared, 16)) == [feed]  # within the cap: the feed itself


def test_argmax_agreement_only_for_class_like_outputs():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 6, 5))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    assert compare_outputs("p", probs, probs.copy(), rtol=1e-4).argmax_agreement == 1.0
    # A detector's [1, 1, H, W] map: its last axis is the width, not classes.
    heatmap = rng.random((1, 1, 8, 8)).astype(np.float32)
    assert compare_outputs("m", heatmap, heatmap.copy(), rtol=1e-4).argmax_agreement is None


def test_string_outputs_are_compared_exactly():
    """Issue 9, 10: string outputs must not be cast to float (was an internal error)."""
    from onnxshrink.verify.parity import OutputStats

    same = OutputStats("s", 1e-4, 1e-6)
    words = np.array(["a", "bc"], dtype=object)
    same.update(words, words.copy())
    assert same.result().ok
    other = OutputStats("s", 1e-4, 1e-6)
    other.update(words, np.array(["a", "bd"], dtype=object))
    result = other.result()
    assert not result.ok and "must match exactly" in (result.reason or "")


def test_sequence_outputs_of_tensors_that_differ_in_shape():
    """Issue 9, 10: SplitToSequence gives a list of tensors of different shapes; numpy cannot
    stack them, which read as "the original fails on the inputs" (exit 2)."""
    model = make_model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[3,6] x, int64[2] split) => (seq(float[3,?]) parts) {
    parts = SplitToSequence<axis = 1>(x, split)
}"""
    )
    feed = {"x": np.arange(18, dtype=np.float32).reshape(3, 6), "split": np.array([2, 4])}
    report = check_parity(model, model, [feed])
    assert report.verified and report.passed, report.reason
    assert report.outputs[0].max_abs == 0.0
    stats = OutputStats("parts")
    stats.update([np.zeros((3, 2)), np.ones((3, 4))], [np.zeros((3, 2)), np.ones((3, 3))])
    assert not stats.result().ok
    shorter = OutputStats("parts")
    shorter.update([np.zeros(2), np.ones(4)], [np.zeros(2)])
    assert not shorter.result().ok and shorter.result().max_abs == float("inf")


# Issue 9, 7: a run that never ends (a Loop of INT64_MAX iterations) is stopped at the limit.


def test_endless_run_is_stopped_at_the_time_limit():
    import time

    model = endless_loop_model()
    feeds = [{"x": np.ones(2, np.float32)}]
    start = time.perf_counter()
    with pytest.raises(TimeLimitError, match=r"time limit of 0\.5 s \(the original model"):
        check_parity(model, model, feeds, time_limit=0.5)
    assert time.perf_counter() - start < 30


def test_time_limit_leaves_runs_that_finish_alone(conv_bn_model):
    feeds = [{"x": np.ones((1, 3, 8, 8), np.float32)}]
    for limit in (None, 0, 30.0):
        assert check_parity(conv_bn_model, conv_bn_model, feeds, time_limit=limit).passed


def test_run_with_limit_passes_other_failures_through(conv_bn_model):
    session = ort_session(conv_bn_model)
    with pytest.raises(Exception) as caught:
        run_with_limit(session, None, {"x": np.ones((2, 2), np.float32)}, 30.0, "test")
    assert not isinstance(caught.value, TimeLimitError)


def test_generated_scalar_bool_input_is_an_array():
    """A bool scalar input (an If condition) came out as numpy.bool_, which ORT refuses."""
    model = make_model("""<ir_version: 8, opset_import: ["" : 13]>
g (float[2] x, bool c) => (float[2] y) {
    y = If (c) <then_branch = t () => (float[2] a) { a = Relu (x) },
                else_branch = e () => (float[2] b) { b = Neg (x) }>
}""")
    feed = generate_inputs(model)
    assert isinstance(feed["c"], np.ndarray) and feed["c"].shape == ()
    assert check_parity(model, model, [feed]).passed


def test_inputs_that_cannot_be_generated_are_usage_errors(conv_bn_model):
    """Found by bench/fuzz.py: a declared input dim of 2^40 was a MemoryError, a sequence
    input a KeyError (both internal errors)."""
    huge = onnx.ModelProto()
    huge.CopyFrom(conv_bn_model)
    huge.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    with pytest.raises(UsageError, match=r"would take .* GiB; pin its dims with --input-shape"):
        generate_inputs(huge)
    sequence = onnx.ModelProto()
    sequence.CopyFrom(conv_bn_model)
    sequence.graph.input[0].type.CopyFrom(
        onnx.helper.make_sequence_type_proto(
            onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [2])
        )
    )
    with pytest.raises(UsageError, match="is a sequence_type, not a tensor"):
        generate_inputs(sequence)
