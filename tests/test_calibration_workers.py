"""Data-parallel calibration (`--calibration-workers`, issue 13): shards observed in worker
processes merge into exactly the statistics of one pass (calibration docstring, 14)."""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
from fractions import Fraction
from typing import TypeVar

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.quant import calibration
from onnxshrink.quant.calibration import (
    HIST_SAMPLE,
    METHODS,
    CalibrationData,
    ChannelMeanObserver,
    ChannelRangeObserver,
    HistogramObserver,
    MinMaxObserver,
    calibration_feeds,
    collect_statistics,
)
from tests.helpers import make_model
from tests.rules.test_int8 import _samples, build_net

runner = CliRunner()
T = TypeVar("T")

#: x [N, 4, 64, 64] -> Conv (8 channels) -> Relu -> transposed channels-last, and a MatMul:
#: the Conv output of 4 samples holds 131,072 elements, more than twice HIST_SAMPLE, so its
#: histogram is built from a systematic sample
_TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 64, 64] x) => (float[N, 64, 64, 8] y, float[N, 8] z) {
    c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
    r = Relu(c)
    y = Transpose<perm = [0, 2, 3, 1]>(r)
    p = ReduceMean<axes = [2, 3], keepdims = 0>(c)
    z = MatMul(p, m)
}"""


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return make_model(
        _TEXT,
        {
            "w": rng.normal(size=(8, 4, 3, 3)).astype(np.float32) / 3,
            "b": rng.normal(size=8).astype(np.float32),
            "m": rng.normal(size=(8, 8)).astype(np.float32),
        },
    )


def _feeds(runs: int = 6, spread: bool = False) -> list[dict[str, np.ndarray]]:
    """`runs` feeds of 4 samples; `spread`: each run 20x wider than the one before, so that
    the shards' first histogram bounds differ by many doublings."""
    rng = np.random.default_rng(1)
    feeds = []
    for i in range(runs):
        scale = 20.0 ** (i - 2) if spread else 1.0
        x = rng.normal(size=(4, 4, 64, 64)) * scale + rng.normal(size=(1, 4, 1, 1))
        feeds.append({"x": x.astype(np.float32)})
    return feeds


_NAMES = ["x", "c", "r", "y", "p", "z", "w"]


def _stats(feeds, method: str, workers: int, **extra):
    return collect_statistics(
        _model(),
        _NAMES,
        feeds,
        method=method,
        mean_axes={"c": 1, "p": 1},
        channel_ranges=["y"],
        workers=workers,
        **extra,
    )


def _assert_identical(one, many) -> None:
    assert one.ranges == many.ranges  # exact: every lo and hi
    assert one.runs == many.runs
    assert set(one.channel_means) == set(many.channel_means) == {"c", "p"}
    for name, mean in one.channel_means.items():
        assert np.array_equal(mean, many.channel_means[name])
    assert set(one.channel_ranges) == set(many.channel_ranges) == {"y"}
    for a, b in zip(one.channel_ranges["y"], many.channel_ranges["y"], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spread", [False, True])
def test_workers_give_the_ranges_of_one_pass(method: str, spread: bool) -> None:
    feeds = _feeds(spread=spread)
    one = _stats(feeds, method, 1)
    assert one.runs == 6 and set(one.ranges) == set(_NAMES)
    for workers in (2, 3):
        _assert_identical(one, _stats(feeds, method, workers))


@pytest.mark.parametrize("start", ["fork", "spawn"])
@pytest.mark.parametrize("on_run_samples", [8, 14])
@pytest.mark.parametrize("source", ["npz", "feeds"])
def test_workers_read_their_shards_and_keep_the_hooks_runs(
    tmp_path, monkeypatch, source, on_run_samples, start
) -> None:
    """An .npz source is re-read by each worker (feed lists are sent); the runs the hook asks
    for reach it in run order, also when the first shard holds too few (14 samples: runs 0-3
    of 4 samples each, the first of two shards holding runs 0-1). Workers forked (as on Linux)
    and spawned (as on macOS and Windows), forced either way."""
    if start == "fork" and not sys.platform.startswith("linux"):
        pytest.skip("workers are forked on Linux only")
    context = multiprocessing.get_context(start)
    monkeypatch.setattr(calibration, "start_method", lambda cuda=False: context)
    feeds = _feeds(runs=5, spread=True)
    data: CalibrationData | list[dict[str, np.ndarray]] = feeds
    if source == "npz":
        path = tmp_path / "calib.npz"
        np.savez(path, x=np.concatenate([f["x"] for f in feeds]))
        npz = calibration_feeds(path, _model(), max_batch=4)
        assert npz.npz is not None and len(npz) == 5
        data = npz
    seen: dict[int, list] = {1: [], 2: []}
    results = {}
    for workers in (1, 2):
        results[workers] = _stats(
            data,
            "entropy",
            workers,
            on_run=lambda feed, outs, w=workers: seen[w].append((feed, outs)),
            on_run_samples=on_run_samples,
        )
    _assert_identical(results[1], results[2])
    assert len(seen[1]) == 5  # one pass: every run
    assert len(seen[2]) == -(-on_run_samples // 4)  # workers: the runs holding those samples
    for (feed1, outs1), (feed2, outs2) in zip(seen[1], seen[2], strict=False):
        assert np.array_equal(feed1["x"], feed2["x"])
        assert all(np.array_equal(a, b) for a, b in zip(outs1, outs2, strict=True))


def test_more_workers_than_runs_and_bad_counts() -> None:
    feeds = _feeds(runs=2)
    _assert_identical(_stats(feeds, "mse", 1), _stats(feeds, "mse", 4))
    with pytest.raises(Exception, match="calibration-workers 0"):
        _stats(feeds, "mse", 0)


# --- observers merge exactly -------------------------------------------------------------------


def _data(seed: int, scale: float, size: int = 5000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=size) * scale).astype(np.float32)


@pytest.mark.parametrize(
    "scales",
    [(1.0, 1.0), (1e-3, 1e3), (1e3, 1e-3), (0.0, 5.0), (5.0, 0.0), (0.7, 0.7000001)],
)
def test_histogram_merge_equals_one_observer(scales) -> None:
    parts = [_data(i, s) for i, s in enumerate(scales)]
    whole = HistogramObserver("percentile")
    for i, part in enumerate(parts):
        whole.update(part, key=i + 1)
    merged = HistogramObserver("percentile")
    for i, part in enumerate(parts):
        shard = HistogramObserver("percentile")
        shard.update(part, key=i + 1)
        merged.merge(shard)
    assert merged.bound == whole.bound
    assert np.array_equal(merged.hist, whole.hist)
    assert (merged.min, merged.max, merged.count) == (whole.min, whole.max, whole.count)
    assert merged.range() == whole.range()


def test_histogram_bounds_are_powers_of_two_above_the_data() -> None:
    for reach in (0.3, 1.0, 6.0, 1e-20, 3e30):
        obs = HistogramObserver()
        obs.update(np.array([-reach, 0.0], dtype=np.float32))
        mantissa, _ = np.frexp(obs.bound)
        assert mantissa == 0.5 and obs.bound > np.float32(reach) >= obs.bound / 2
    zeros = HistogramObserver()
    zeros.update(np.zeros(10, dtype=np.float32))
    assert zeros.bound == 0.0 and zeros.range() == (0.0, 0.0)


def test_binning_does_not_depend_on_the_bound_it_was_done_at() -> None:
    """A value binned at a fine bound and regrouped lands where binning at the coarse bound
    puts it: values on bin edges, just below them, powers of two, tiny negatives."""
    rng = np.random.default_rng(3)
    edges = (np.arange(-2048, 2048) / 2048).astype(np.float32)
    values = np.concatenate(
        [
            edges,
            np.nextafter(edges, np.float32(-np.inf)),
            np.nextafter(edges, np.float32(np.inf)),
            np.array([0.5, 0.25, -0.5, -0.25, -1e-30, 1e-30, -1e-45, 1e-45, -0.0], np.float32),
            rng.uniform(-1, 1, 20000).astype(np.float32),
        ]
    ).astype(np.float32)
    values = values[np.abs(values) < 1.0]
    fine = HistogramObserver()
    fine.update(values)  # bound 1
    assert fine.bound == 1.0
    fine.update(np.array([-7.5], np.float32))  # grows to 8: regrouped by 8
    coarse = HistogramObserver()
    coarse.update(np.array([-7.5], np.float32))
    coarse.update(values)  # binned at 8 directly
    assert coarse.bound == fine.bound == 8.0
    assert np.array_equal(fine.hist, coarse.hist)


def test_large_tensors_are_sampled_by_run_key_not_update_count() -> None:
    big = _data(5, 1.0, size=4 * HIST_SAMPLE + 17)
    first, second = HistogramObserver(), HistogramObserver()
    first.update(_data(6, 1.0), key=1)
    first.update(big, key=2)
    second.update(big, key=2)  # the same run seen first by another worker
    second.merge(_observed(_data(6, 1.0), key=1))
    assert np.array_equal(first.hist, second.hist)
    other = HistogramObserver()
    other.update(big, key=3)
    assert not np.array_equal(other.hist, _observed(big, key=2).hist)  # the key moves the sample


def _observed(array: np.ndarray, key: int) -> HistogramObserver:
    obs = HistogramObserver()
    obs.update(array, key=key)
    return obs


def test_histogram_merge_refuses_other_observers() -> None:
    with pytest.raises(ValueError):
        HistogramObserver().merge(MinMaxObserver())
    with pytest.raises(ValueError):
        HistogramObserver(bins=2048).merge(HistogramObserver(bins=1024))


def test_channel_observers_merge_exactly() -> None:
    rng = np.random.default_rng(7)
    parts = [
        (rng.normal(size=(3, 5)) * 10.0 ** rng.integers(-8, 8)).astype(np.float32) for _ in range(9)
    ]
    whole = ChannelMeanObserver(axis=-1)
    ranges = ChannelRangeObserver()
    for part in parts:
        whole.update(part)
        ranges.update(part)
    for cut in (1, 4, 8):
        left, right = ChannelMeanObserver(axis=-1), ChannelMeanObserver(axis=-1)
        rleft, rright = ChannelRangeObserver(), ChannelRangeObserver()
        for part in parts[:cut]:
            left.update(part)
            rleft.update(part)
        for part in parts[cut:]:
            right.update(part)
            rright.update(part)
        left.merge(right)
        rleft.merge(rright)
        assert np.array_equal(_present(left.mean()), _present(whole.mean()))
        merged, one = _present(rleft.value()), _present(ranges.value())
        assert np.array_equal(merged[0], one[0]) and np.array_equal(merged[1], one[1])
    # the exact mean, correctly rounded
    rows = np.concatenate(parts).astype(np.float64)
    expected = [float(sum(map(Fraction, col)) / len(rows)) for col in rows.T]
    assert _present(whole.mean()).tolist() == expected


def _present(value: T | None) -> T:
    assert value is not None
    return value


# --- the command line ----------------------------------------------------------------------------


def test_optimize_with_calibration_workers_writes_the_same_model(tmp_path) -> None:
    model = tmp_path / "net.onnx"
    onnx.save_model(build_net(), str(model))
    calib, held_out = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=_samples(1, 8))
    np.savez(held_out, x=_samples(2, 1))
    digests = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}.onnx"
        result = runner.invoke(
            app,
            [
                "optimize", str(model), "-o", str(out), "--quantize", "int8",
                "--calibration-data", str(calib), "--inputs", str(held_out), "--no-speed-check",
                "--calibration-workers", workers,
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        digests[workers] = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digests["1"] == digests["2"]


def test_calibration_workers_option_is_checked(tmp_path) -> None:
    model = tmp_path / "net.onnx"
    onnx.save_model(build_net(), str(model))
    result = runner.invoke(
        app,
        ["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calibration-workers", "0"],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
