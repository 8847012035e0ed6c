"""Calibration: data sources, observers against numpy on all data at once, collect_ranges."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.errors import UsageError
from onnxshrink.quant.calibration import (
    HistogramObserver,
    MinMaxObserver,
    calibration_feeds,
    collect_ranges,
    entropy_threshold,
    make_observer,
    mse_threshold,
    observe,
    qparams_for_range,
)
from tests.helpers import make_model

CONV_TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
conv (float[N, 2, 8, 8] x) => (float[N, 3, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
}
"""


def conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    return make_model(
        CONV_TEXT,
        initializers={
            "w": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32),
            "w2": rng.normal(size=(3, 4, 3, 3)).astype(np.float32),
            "b2": rng.normal(size=3).astype(np.float32),
        },
    )


def chunks(data: np.ndarray, n: int = 10) -> list[np.ndarray]:
    return np.array_split(data, n)


def heavy_tailed(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # MSE trades clipping error k (50 - t)^2 against rounding error n t^2 / (127^2 12): with
    # n = 2e6 and k = 2 its optimum is near t = 8, far below the outliers.
    data = rng.normal(size=2_000_000).astype(np.float32)
    data[:2] = [50.0, -48.0]
    return rng.permutation(data)


# --- observers -------------------------------------------------------------------------------


def test_minmax_exact_over_chunks() -> None:
    data = np.random.default_rng(0).normal(2.0, 3.0, size=50_000).astype(np.float32)
    obs = MinMaxObserver()
    for part in chunks(data):
        obs.update(part)
    assert obs.range() == (float(data.min()), float(data.max()))
    positive = MinMaxObserver()
    positive.update(np.abs(data) + 1.0)
    assert positive.range()[0] == 0.0  # 0 always inside the range
    assert positive.range()[1] == float((np.abs(data) + 1.0).max())


def test_minmax_ignores_non_finite_and_refuses_empty() -> None:
    obs = MinMaxObserver()
    with pytest.raises(ValueError):
        obs.range()
    obs.update(np.array([1.0, np.nan, -2.0, np.inf], dtype=np.float32))
    assert obs.range() == (-2.0, 1.0)


def test_histogram_merge_matches_one_update_of_everything() -> None:
    rng = np.random.default_rng(3)
    # Growing magnitudes, so that the range doubles several times while streaming.
    parts = [rng.normal(0.0, 0.1 * (i + 1) ** 2, size=5_000).astype(np.float32) for i in range(10)]
    everything = np.concatenate(parts)
    streamed = HistogramObserver("percentile")
    for part in parts:
        streamed.update(part)
    # Exact merging: the same counts as binning all data at once on the final edges.
    direct, _ = np.histogram(everything, bins=streamed.edges())
    assert streamed.hist.sum() == everything.size
    # float32 rounding moves a handful of values sitting on a bin edge to the neighbour bin.
    assert np.abs(streamed.hist - direct).sum() <= 1e-3 * everything.size
    assert np.abs(np.cumsum(streamed.hist) - np.cumsum(direct)).max() <= 5
    assert streamed.bound >= np.abs(everything).max()
    assert streamed.bound < 2 * np.abs(everything).max()
    # One update of the concatenation gives (nearly) the same ranges.
    whole = HistogramObserver("percentile")
    whole.update(everything)
    tolerance = 2 * max(streamed.width, whole.width)
    np.testing.assert_allclose(streamed.range(), whole.range(), atol=tolerance)


def test_histogram_growth_from_zeros() -> None:
    obs = HistogramObserver("percentile", percentile=100.0)
    obs.update(np.zeros(100, dtype=np.float32))
    assert obs.range() == (0.0, 0.0)
    obs.update(np.array([-1.0, 3.0], dtype=np.float32))
    assert obs.hist.sum() == 102
    lo, hi = obs.range()
    assert lo == pytest.approx(-1.0, abs=obs.width) and hi == pytest.approx(3.0, abs=obs.width)


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_close_to_numpy(symmetric: bool) -> None:
    rng = np.random.default_rng(5)
    data = np.concatenate(
        [rng.normal(1.0, 2.0, size=60_000), rng.exponential(3.0, size=40_000)]
    ).astype(np.float32)
    obs = HistogramObserver("percentile", percentile=99.9, symmetric=symmetric)
    for part in chunks(rng.permutation(data)):
        obs.update(part)
    lo, hi = obs.range()
    if symmetric:
        t = np.percentile(np.abs(data), 99.9)
        assert hi == pytest.approx(t, abs=obs.width)
        assert lo == pytest.approx(max(-t, data.min()), abs=obs.width)
    else:
        assert lo == pytest.approx(np.percentile(data, 0.1), abs=obs.width)
        assert hi == pytest.approx(np.percentile(data, 99.9), abs=obs.width)


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
def test_histogram_methods_clip_outliers(method: str) -> None:
    data = heavy_tailed()
    obs = HistogramObserver(method, percentile=99.99, symmetric=True)
    for part in chunks(data):
        obs.update(part)
    lo, hi = obs.range()
    top = float(np.abs(data).max())
    assert lo <= 0.0 <= hi
    assert max(-lo, hi) <= top
    # The bulk is N(0, 1): the range must cover it and drop the +-50 outliers.
    assert 2.0 < hi < 15.0, hi
    assert -15.0 < lo < -2.0, lo


def test_entropy_and_mse_keep_the_range_of_uniform_data() -> None:
    data = np.random.default_rng(2).uniform(-1.0, 1.0, size=100_000).astype(np.float32)
    for method in ("entropy", "mse"):
        obs = HistogramObserver(method)
        obs.update(data)
        lo, hi = obs.range()
        assert hi > 0.9 and lo < -0.9, (method, lo, hi)  # nothing to clip: no outliers


def test_thresholds_directly_on_histograms() -> None:
    # A half-normal bulk (sigma 60 bins) and one far outlier.
    hist = np.round(1e6 * np.exp(-0.5 * (np.arange(2048) / 60.0) ** 2)).astype(np.int64)
    hist[2000] = 1
    width = 0.01
    assert entropy_threshold(hist, width) < 0.5 * 2000 * width
    assert mse_threshold(hist, width) < 0.5 * 2000 * width
    assert entropy_threshold(np.zeros(2048), width) == 2048 * width


def test_mse_threshold_beats_neighbours_on_fake_quantization(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onnxshrink.quant.calibration as calibration_module

    monkeypatch.setattr(calibration_module, "HIST_SAMPLE", 1 << 30)  # the math on every value
    data = heavy_tailed(1)
    obs = HistogramObserver("mse")
    obs.update(data)
    t = obs.range()[1]

    def error(threshold: float) -> float:
        s = threshold / 127
        q = np.clip(np.round(data / s), -127, 127) * s
        return float(np.mean((q - data) ** 2))

    assert error(t) <= 1.05 * min(error(0.5 * t), error(2.0 * t), error(50.0))


def test_observer_memory_is_constant() -> None:
    rng = np.random.default_rng(0)
    for obs in (MinMaxObserver(), HistogramObserver("entropy")):
        for i in range(10):
            obs.update(rng.normal(0, 1 + i, size=1000).astype(np.float32))
        after_10 = obs.nbytes
        for i in range(990):
            obs.update(rng.normal(0, 1 + i % 50, size=1000).astype(np.float32))
        assert obs.nbytes == after_10


def test_observer_nbytes_sees_state_that_grows() -> None:
    """The measure above can fail: an observer that keeps every batch grows in nbytes."""

    class Hoarding(MinMaxObserver):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[np.ndarray] = []

        def _update(self, x: np.ndarray, lo: float, hi: float, key: int | None) -> None:
            self.seen.append(x)

    obs = Hoarding()
    obs.update(np.zeros(100, np.float32))
    before = obs.nbytes
    obs.update(np.zeros(100, np.float32))
    assert obs.nbytes == before + 400


@pytest.mark.parametrize(
    ("lo", "hi", "dtype", "symmetric", "expected_zero_point"),
    [
        (-1.3, 4.7, "uint8", False, 55),  # 1.3 / (6 / 255) = 55.25
        (-1.3, 4.7, "int8", False, -73),  # -128 + 55
        (0.0, 6.0, "uint8", False, 0),
        (-3.0, 0.0, "int8", False, 127),
        (-1.3, 4.7, "int8", True, 0),
        (-1.3, 4.7, "uint8", True, 128),
        (0.0, 0.0, "uint8", False, 0),
    ],
)
def test_qparams(
    lo: float, hi: float, dtype: str, symmetric: bool, expected_zero_point: int
) -> None:
    scale, zero_point = qparams_for_range(lo, hi, dtype, symmetric)
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    assert scale > 0 and isinstance(zero_point, int)
    assert scale == float(np.float32(scale))
    # real 0 maps to the integer the algebra says (module docstring 7-8), so padding is exact
    assert zero_point == expected_zero_point
    # every value of the range round-trips within half a step (one step at a clipped end)
    values = np.linspace(lo, hi, 101)
    q = np.clip(np.round(values / scale) + zero_point, qmin, qmax)
    assert np.max(np.abs((q - zero_point) * scale - values)) <= scale * 0.5 + 1e-6 or (
        symmetric and dtype == "uint8"
    )
    # The range is covered to within one step.
    if hi > lo:
        assert (qmax - zero_point) * scale >= hi - scale
        assert (qmin - zero_point) * scale <= lo + scale
    if symmetric:
        assert zero_point == (0 if dtype == "int8" else 128)


def test_observer_qparams_and_bad_arguments() -> None:
    obs = make_observer("minmax")
    obs.update(np.array([-2.0, 6.0], dtype=np.float32))
    assert obs.qparams("int8", symmetric=True) == (pytest.approx(6.0 / 127), 0)
    with pytest.raises(UsageError):
        obs.qparams("int4")
    with pytest.raises(UsageError):
        make_observer("kl")
    with pytest.raises(UsageError):
        HistogramObserver("entropy", bins=1000)


# --- collect_ranges ----------------------------------------------------------------------------


def _minmax_by_running(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> dict:
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        copy.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    arrays = [session.run(names, feed) for feed in feeds]
    return {
        n: (
            min(0.0, min(float(a[i].min()) for a in arrays)),
            max(0.0, max(float(a[i].max()) for a in arrays)),
        )
        for i, n in enumerate(names)
    }


def test_collect_ranges_matches_tensors_computed_directly() -> None:
    model = conv_model()
    feeds = [_feed(seed) for seed in range(5)]
    names = ["c", "r", "y"]
    progress: list[tuple[int, int]] = []
    ranges = collect_ranges(model, names, feeds, progress=lambda d, t: progress.append((d, t)))
    expected = _minmax_by_running(model, names, feeds)
    assert set(ranges) == set(names)
    for name in names:
        np.testing.assert_allclose(ranges[name], expected[name], rtol=1e-6)
    assert ranges["r"][0] == 0.0
    assert progress[-1] == (5, 5)


def _feed(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(2, 2, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_collect_ranges_histogram_methods_inside_minmax(method: str) -> None:
    model = conv_model()
    feeds = [_feed(s) for s in range(4)]
    names = ["x", "c", "r", "w"]  # a graph input and an initializer too
    ranges = collect_ranges(model, names, feeds, method=method, percentile=99.9)
    bounds = collect_ranges(model, names, feeds, method="minmax")
    for name in names:
        lo, hi = ranges[name]
        assert bounds[name][0] - 1e-6 <= lo <= 0.0 <= hi <= bounds[name][1] + 1e-6
        assert hi - lo > 0.1 * (bounds[name][1] - bounds[name][0])


def test_collect_ranges_bad_requests() -> None:
    model = conv_model()
    with pytest.raises(UsageError, match="not a tensor of the main graph"):
        collect_ranges(model, ["nope"], [_feed(0)])
    with pytest.raises(UsageError, match="no feeds"):
        collect_ranges(model, ["c"], [])
    with pytest.raises(UsageError, match="method"):
        collect_ranges(model, ["c"], [_feed(0)], method="kl")
    with pytest.raises(UsageError, match="provider"):
        collect_ranges(model, ["c"], [_feed(0)], provider="tpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="not available"):
            collect_ranges(model, ["c"], [_feed(0)], provider="cuda")
    with pytest.raises(UsageError, match="fails on feed 0"):
        collect_ranges(model, ["c"], [{"x": np.zeros((1, 5, 8, 8), np.float32)}])


def test_collect_ranges_skips_non_float_tensors() -> None:
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        m (float[2, 3] x) => (float[2, 3] y) {
            s = Shape (x)
            y = Relu (x)
        }
        """
    )
    observers = observe(model, ["s", "y"], [{"x": np.ones((2, 3), np.float32)}])
    assert list(observers) == ["y"]


# --- data sources --------------------------------------------------------------------------------


def test_npz_source_batches(tmp_path) -> None:
    model = conv_model()
    x = np.random.default_rng(0).normal(size=(7, 2, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = calibration_feeds(str(tmp_path / "calib.npz"), model, batch=3)
    feeds = list(data)
    assert len(data) == 3 and [f["x"].shape[0] for f in feeds] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    assert not data.synthetic
    assert len(list(data)) == 3  # iterating again reads the file again
    whole = list(calibration_feeds(tmp_path / "calib.npz", model))
    assert len(whole) == 1 and whole[0]["x"].shape == (7, 2, 8, 8)


def test_folder_source_streams_files(tmp_path) -> None:
    model = conv_model()
    for i in range(3):
        np.savez(tmp_path / f"{i:02d}.npz", x=_feed(i)["x"])
    feeds = list(calibration_feeds(tmp_path, model))
    assert len(feeds) == 3
    np.testing.assert_array_equal(feeds[2]["x"], _feed(2)["x"])
    ranges = collect_ranges(model, ["c"], calibration_feeds(tmp_path, model))
    assert ranges["c"][0] < 0 < ranges["c"][1]


LOADER = """
import numpy as np

def load_data():
    for i in range(4):
        rng = np.random.default_rng(i)
        yield {"x": rng.normal(size=(1, 2, 8, 8)).astype(np.float32)}

def wrong_name():
    yield {"image": np.zeros((1, 2, 8, 8), np.float32)}

def wrong_dtype():
    yield {"x": np.zeros((1, 2, 8, 8), np.float64)}

def broken():
    raise RuntimeError("disk on fire")
"""


def test_loader_script_source(tmp_path) -> None:
    model = conv_model()
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    feeds = list(calibration_feeds(str(script), model))
    assert len(feeds) == 4 and feeds[0]["x"].dtype == np.float32
    ranges = collect_ranges(model, ["y"], calibration_feeds(f"{script}:load_data", model))
    assert ranges["y"][0] < ranges["y"][1]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("wrong_name", "'image' not a model input"),
        ("wrong_dtype", "is float64, the model takes float32"),
        ("broken", "disk on fire"),
        ("missing", "defines no function 'missing'"),
    ],
)
def test_loader_script_errors(tmp_path, function: str, message: str) -> None:
    model = conv_model()
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    with pytest.raises(UsageError, match=message) as info:
        list(calibration_feeds(f"{script}:{function}", model))
    assert str(script) in str(info.value) and "\n" not in str(info.value)


def test_loader_script_imports_a_module_beside_it(tmp_path) -> None:
    """A loader can import its own helpers from its folder, at load and while it yields."""
    folder = tmp_path / "data_tools"
    folder.mkdir()
    (folder / "my_dataset_helpers_12.py").write_text(
        "import numpy as np\ndef sample(i):\n    return np.full((1, 2, 8, 8), i, np.float32)\n"
    )
    (folder / "my_lazy_helpers_12.py").write_text("COUNT = 3\n")
    script = folder / "loader.py"
    script.write_text(
        "from my_dataset_helpers_12 import sample\n"
        "def batches():\n"
        "    import my_lazy_helpers_12\n"
        "    for i in range(my_lazy_helpers_12.COUNT):\n"
        "        yield {'x': sample(i)}\n"
    )
    feeds = list(calibration_feeds(f"{script}:batches", conv_model()))
    assert [float(f["x"].max()) for f in feeds] == [0.0, 1.0, 2.0]


def test_loader_script_that_does_not_import(tmp_path) -> None:
    script = tmp_path / "bad.py"
    script.write_text("import not_a_module_anywhere\n")
    with pytest.raises(UsageError, match="cannot import"):
        calibration_feeds(str(script), conv_model())


def test_random_source_warns(caplog) -> None:
    model = conv_model()
    with caplog.at_level("WARNING", logger="onnxshrink.quant.calibration"):
        data = calibration_feeds("random", model, random_samples=3)
    assert data.synthetic and len(data) == 3
    assert "random" in caplog.text
    feeds = list(data)
    assert feeds[0]["x"].shape == (1, 2, 8, 8) and feeds[0]["x"].dtype == np.float32


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.npz", "no such file"),
        ("missing_loader.py", "no such loader script"),
        ("", "--calibration-data with an .npz"),
        ("calib.txt", "not an .npz file or loader script"),
    ],
)
def test_bad_specs(tmp_path, monkeypatch, spec: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text("1 2 3")
    with pytest.raises(UsageError, match=message):
        calibration_feeds(spec, conv_model())


def test_npz_missing_input_names_calibration_option(tmp_path) -> None:
    np.savez(tmp_path / "calib.npz", image=np.zeros((1, 2, 8, 8), np.float32))
    with pytest.raises(UsageError, match="--calibration-data .*no array for model input"):
        calibration_feeds(tmp_path / "calib.npz", conv_model())


def test_collect_statistics_channel_means_match_numpy() -> None:
    from onnxshrink.quant.calibration import ChannelMeanObserver, collect_statistics

    model = conv_model()
    feeds = [_feed(seed) for seed in range(4)]
    stats = collect_statistics(model, ["x", "r"], feeds, mean_axes={"r": 1, "x": 1})
    assert set(stats.ranges) == {"x", "r"}
    expected = _arrays_by_running(model, ["r"], feeds)["r"]
    np.testing.assert_allclose(
        stats.channel_means["r"], expected.astype(np.float64).mean(axis=(0, 2, 3))
    )
    xs = np.concatenate([f["x"] for f in feeds])
    np.testing.assert_allclose(stats.channel_means["x"], xs.astype(np.float64).mean(axis=(0, 2, 3)))
    # a tensor without the asked axis gets no mean, and no error
    stats = collect_statistics(model, ["r"], feeds, mean_axes={"r": 7})
    assert stats.channel_means == {} and "r" in stats.ranges
    # the observer alone: streaming equals all at once; a channel-count change is refused
    obs = ChannelMeanObserver(axis=-1)
    data = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    for part in np.array_split(data, 3):
        obs.update(part)
    mean = obs.mean()
    assert mean is not None
    np.testing.assert_allclose(mean, data.astype(np.float64).mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="channel count"):
        obs.update(np.zeros((2, 5)))
    assert ChannelMeanObserver(axis=0).mean() is None


def _arrays_by_running(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from onnxshrink.engine.io import with_outputs

    sess = ort.InferenceSession(
        with_outputs(model, names).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    outs = [o.name for o in sess.get_outputs()]
    runs = [dict(zip(outs, sess.run(None, f), strict=True)) for f in feeds]
    return {n: np.concatenate([r[n] for r in runs]) for n in names}


def test_large_tensors_are_histogrammed_on_a_sample_with_exact_min_max() -> None:
    from onnxshrink.quant.calibration import HIST_SAMPLE

    rng = np.random.default_rng(5)
    feeds = [rng.normal(0.0, 1.0, size=(4, 64, 32, 32)).astype(np.float32) for _ in range(8)]
    sampled = HistogramObserver("percentile", percentile=99.9)
    for x in feeds:
        sampled.update(x)
    # about HIST_SAMPLE values binned per update, not all 262,144
    assert 8 * HIST_SAMPLE // 2 <= sampled.hist.sum() <= 8 * 2 * HIST_SAMPLE
    everything = np.concatenate([x.ravel() for x in feeds])
    assert sampled.min == everything.min() and sampled.max == everything.max()
    lo, hi = sampled.range()
    expected = np.percentile(everything, [0.1, 99.9])
    np.testing.assert_allclose([lo, hi], expected, rtol=0.03)
