"""`onnxshrink bench`: interleaved timing, ratios, skipped providers, placement, JSON, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxshrink.bench import (
    BenchRow,
    _placement_warnings,
    benchmark,
    is_quantized,
    parse_profile,
    parse_providers,
)
from onnxshrink.cli import app
from onnxshrink.errors import UsageError
from tests.helpers import make_model

runner = CliRunner()
FAST = ["--runs", "5", "--warmup", "1"]
WIDTH = 128


def _fast_model() -> onnx.ModelProto:
    """One Add on a [N, 128] input."""
    return make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        fast (float[N,{WIDTH}] x) => (float[N,{WIDTH}] y) {{
            y = Add (x, x)
        }}
        """
    )


def _slow_model(links: int = 20) -> onnx.ModelProto:
    """The same interface, 20 MatMul+Relu links deep: many times the work of `_fast_model`."""
    lines = []
    prev = "x"
    for i in range(links):
        out = "y" if i == links - 1 else f"r{i}"
        lines.append(f"m{i} = MatMul ({prev}, w{i})")
        lines.append(f"{out} = Relu (m{i})")
        prev = out
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.normal(0, 0.1, (WIDTH, WIDTH)).astype(np.float32) for i in range(links)}
    body = "\n            ".join(lines)
    return make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        slow (float[N,{WIDTH}] x) => (float[N,{WIDTH}] y) {{
            {body}
        }}
        """,
        weights,
    )


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, str(path))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """(fast path, slow path)."""
    return _save(_fast_model(), tmp_path / "fast.onnx"), _save(
        _slow_model(), tmp_path / "slow.onnx"
    )


@pytest.fixture
def cpu_only(monkeypatch):
    """Make this onnxruntime offer the CPU provider only, whatever build is installed."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def _run(*args: str):
    result = runner.invoke(app, ["bench", *args])
    assert "Traceback" not in result.output
    return result


def _json(*args: str) -> dict:
    result = _run(*args, "--json", "-")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_two_models_both_rows_with_ratio(pair):
    fast, slow = pair
    result = _run(fast, slow, "--batch", "8", *FAST)
    assert result.exit_code == 0, result.output
    for text in (fast, slow, "vs first", "p50 ms", "placement", "CPU 100%"):
        assert text in result.output
    data = _json(fast, slow, "--batch", "8", *FAST)
    rows = {r["model"]: r for r in data["rows"]}
    assert list(rows) == [fast, slow]
    assert rows[fast]["ratio"] == 1.0
    # 20 MatMuls of 128x128 against one Add: far slower whatever the noise.
    assert rows[slow]["ratio"] > 1.5
    assert rows[slow]["ratio"] == pytest.approx(rows[slow]["p50_ms"] / rows[fast]["p50_ms"])


def test_json_fields_and_figures_are_consistent(pair):
    fast, slow = pair
    data = _json(fast, slow, "--batch", "4", *FAST)
    assert {"rows", "skipped", "environment", "warnings", "runs", "warmup", "iobinding"} <= set(
        data
    )
    assert data["environment"]["onnxruntime"] == ort.__version__
    assert "CPUExecutionProvider" in data["environment"]["available_providers"]
    for row in data["rows"]:
        for key in (
            "model",
            "provider",
            "p50_ms",
            "p90_ms",
            "mean_ms",
            "throughput",
            "session_s",
            "peak_mb",
            "placement",
            "ratio",
            "runs",
        ):
            assert key in row
        assert row["provider"] == "cpu"
        assert row["runs"] == 5
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"]
        assert row["samples"] == 4
        assert row["throughput"] == pytest.approx(4 / (row["mean_ms"] / 1000))
        assert row["session_s"] > 0
        assert row["peak_mb"] is None or row["peak_mb"] >= 0


def test_cpu_placement_is_all_cpu(pair):
    fast, slow = pair
    report = benchmark([fast, slow], ["cpu"], warmup=1, runs=3)
    for row in report.rows:
        assert row.placement == {"CPUExecutionProvider": 1.0}
        assert row.time_share == {"CPUExecutionProvider": 1.0}
        assert row.nodes_executed >= 1
        assert row.warnings == []
    # ORT runs the chain's 40 nodes (perhaps fused a little); the Add is one node.
    assert report.rows[0].nodes_executed == 1
    assert report.rows[1].nodes_executed >= 20


def test_unavailable_provider_beside_cpu_is_skipped(pair, cpu_only):
    fast, slow = pair
    result = _run(fast, slow, "--provider", "cpu,cuda", *FAST)
    assert result.exit_code == 0, result.output
    assert "skipped cuda" in result.output
    assert "CUDAExecutionProvider is not available" in result.output
    assert "onnxruntime-gpu" in result.output
    data = _json(fast, "-p", "cpu", "-p", "tensorrt", *FAST)
    assert [r["provider"] for r in data["rows"]] == ["cpu"]
    assert [s["provider"] for s in data["skipped"]] == ["tensorrt"]
    assert "tensorrt" in data["skipped"][0]["reason"].lower()


def test_only_unavailable_provider_exits_1_with_reason(pair, cpu_only):
    fast, _ = pair
    result = _run(fast, "--provider", "cuda", *FAST)
    assert result.exit_code == 1
    assert "CUDAExecutionProvider is not available" in result.output
    assert "nothing ran" in result.output


def test_failing_model_is_skipped_others_still_run(tmp_path, pair):
    fast, _ = pair
    # Reshape to rows of 3 fails on a [1, 128] input at run time, not at load time.
    bad = make_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        bad (float[N,{WIDTH}] x) => (float[M,3] y) {{
            y = Reshape (x, shape)
        }}
        """,
        {"shape": np.array([-1, 3], dtype=np.int64)},
    )
    bad_path = _save(bad, tmp_path / "bad.onnx")
    report = benchmark([bad_path, fast], ["cpu"], warmup=1, runs=3)
    assert [r.model for r in report.rows] == [fast]
    # The reference (first) model failed: there is nothing to take a ratio against.
    assert report.rows[0].ratio is None
    assert len(report.skipped) == 1
    assert report.skipped[0][0] == "cpu"
    assert "bad.onnx" in report.skipped[0][1] and "fails on the inputs" in report.skipped[0][1]


def test_iobinding_on_cpu(pair):
    fast, slow = pair
    report = benchmark([fast, slow], ["cpu"], warmup=1, runs=3, iobinding=True, batch=2)
    assert [r.model for r in report.rows] == [fast, slow]
    assert report.iobinding
    assert report.rows[1].ratio > 1


def test_inputs_npz_feeds_every_model(tmp_path, pair):
    fast, slow = pair
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((3, WIDTH), np.float32))
    data = _json(fast, slow, "--inputs", str(npz), *FAST)
    assert [r["samples"] for r in data["rows"]] == [3, 3]


def test_input_shape_sets_dims(pair):
    fast, _ = pair
    data = _json(fast, "--input-shape", f"x:6,{WIDTH}", *FAST)
    assert data["rows"][0]["samples"] == 6


def test_progress_reports_every_round(pair):
    fast, slow = pair
    calls = []
    benchmark([fast, slow], ["cpu"], warmup=2, runs=3, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (5, 5)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda f, t: [str(t / "absent.onnx")], "no such file"),
        (lambda f, t: [f, "--provider", "gpu2"], "bad --provider"),
        (lambda f, t: [f, "--provider", ","], "names no provider"),
        (lambda f, t: [f, "--input-shape", "x=1,2"], "bad --input-shape"),
        (lambda f, t: [f, "--input-shape", "q:1,128"], "not an input of any model"),
        (lambda f, t: [f, "--input-shape", "x:1,2,3"], "rank"),
        (lambda f, t: [f, "--runs", "0"], "--runs must be at least 1"),
        (lambda f, t: [f, "--inputs", str(t / "none.npz")], "no such file"),
        (lambda f, t: [f, "--json", str(t / "no" / "r.json")], "does not exist"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, pair, make_args, message):
    result = _run(*FAST, *make_args(pair[0], tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.tmp"))


def test_npz_missing_an_input_exit_2(tmp_path, pair):
    npz = tmp_path / "in.npz"
    np.savez(npz, other=np.ones((1, WIDTH), np.float32))
    result = _run(pair[0], "--inputs", str(npz), *FAST)
    assert result.exit_code == 2
    assert "no array for model input(s) x" in result.output


def test_batch_on_fixed_axis_0_exit_2(tmp_path):
    fixed = make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        fixed (float[1,4] x) => (float[1,4] y) {
            y = Relu (x)
        }
        """
    )
    path = _save(fixed, tmp_path / "fixed.onnx")
    result = _run(path, "--batch", "4", *FAST)
    assert result.exit_code == 2
    assert "no input has a dynamic axis 0" in result.output


def test_json_file_written(tmp_path, pair):
    out = tmp_path / "r.json"
    result = _run(*pair, "--json", str(out), *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2
    assert "vs first" in result.output  # the table is printed too


def test_parse_providers():
    assert parse_providers("cpu, CUDA,trt") == ["cpu", "cuda", "tensorrt"]
    assert parse_providers(["cpu", "CPUExecutionProvider"]) == ["cpu"]
    with pytest.raises(UsageError, match="bad --provider 'rocm'"):
        parse_providers("cpu,rocm")


def _qdq_model() -> onnx.ModelProto:
    return make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        q (float[1,4] x) => (float[1,4] y) {
            q = QuantizeLinear (x, s, z)
            y = DequantizeLinear (q, s, z)
        }
        """,
        {"s": np.array(0.1, np.float32), "z": np.array(0, np.uint8)},
    )


def test_is_quantized():
    assert is_quantized(_qdq_model())
    assert not is_quantized(_fast_model())


def test_quantized_model_on_cpu_has_no_fallback_warning(tmp_path):
    path = _save(_qdq_model(), tmp_path / "q.onnx")
    report = benchmark([path], ["cpu"], warmup=1, runs=3)
    (row,) = report.rows
    assert row.quantized
    assert row.placement == {"CPUExecutionProvider": 1.0}
    assert row.warnings == [] and row.fallback_ops == {}


def test_parse_profile_counts_nodes_per_provider_and_skips_copies():
    def node(name, provider, op, dur=10):
        return {
            "cat": "Node",
            "name": f"{name}_kernel_time",
            "dur": dur,
            "args": {"provider": provider, "op_name": op},
        }

    events = [
        {"cat": "Session", "name": "model_run", "dur": 100},
        node("conv", "CUDAExecutionProvider", "Conv", 30),
        node("conv", "CUDAExecutionProvider", "Conv", 30),  # a second run: still one node
        node("qc", "CPUExecutionProvider", "QLinearConv", 50),
        node("copy", "CUDAExecutionProvider", "MemcpyToHost", 5),
        {"cat": "Node", "name": "conv_fence_before", "args": {}},
    ]
    nodes, kernel_us = parse_profile(events)
    assert nodes == {
        "conv": ("CUDAExecutionProvider", "Conv"),
        "qc": ("CPUExecutionProvider", "QLinearConv"),
    }
    assert kernel_us == {"CUDAExecutionProvider": 60.0, "CPUExecutionProvider": 50.0}


def _row(placement, quantized, time_share=None) -> BenchRow:
    return BenchRow(
        "m.onnx", "cuda", 1, 1, 1, 1, 1, 1, 0.0, placement, 1.0, 1,
        quantized=quantized, time_share=time_share or {},
    )  # fmt: skip


def test_quantized_fallback_to_cpu_warns():
    nodes = {
        "a": ("CUDAExecutionProvider", "Conv"),
        "b": ("CUDAExecutionProvider", "Relu"),
        "c": ("CPUExecutionProvider", "QLinearConv"),
    }
    placement = {"CUDAExecutionProvider": 2 / 3, "CPUExecutionProvider": 1 / 3}
    row = _row(placement, quantized=True)
    warnings = _placement_warnings(row, nodes, "CUDAExecutionProvider")
    assert len(warnings) == 1
    assert "quantized model: 1 node(s) fell back to CPU (QLinearConv x1)" in warnings[0]
    assert row.fallback_ops == {"QLinearConv": 1}
    # The same placement for a float model is not a quantization fallback.
    assert (
        _placement_warnings(_row(placement, quantized=False), nodes, "CUDAExecutionProvider") == []
    )


def test_requested_provider_running_few_nodes_warns():
    nodes = {
        "a": ("CUDAExecutionProvider", "Conv"),
        "b": ("CPUExecutionProvider", "NonMaxSuppression"),
        "c": ("CPUExecutionProvider", "TopK"),
    }
    placement = {"CPUExecutionProvider": 2 / 3, "CUDAExecutionProvider": 1 / 3}
    warnings = _placement_warnings(_row(placement, False), nodes, "CUDAExecutionProvider")
    assert warnings == ["most nodes (67%) ran on CPU, not on CUDA (33%)"]
    none = _placement_warnings(
        _row({"CPUExecutionProvider": 1.0}, False), {}, "TensorrtExecutionProvider"
    )
    assert none and "no node ran on Tensorrt" in none[0]
    # TensorRT is judged by kernel time: one engine plus three small CPU nodes is fine.
    trt_nodes = {"e": ("TensorrtExecutionProvider", "TRTKernel_graph_0")}
    trt_nodes |= {f"s{i}": ("CPUExecutionProvider", "Shape") for i in range(3)}
    trt = _row(
        {"CPUExecutionProvider": 0.75, "TensorrtExecutionProvider": 0.25},
        False,
        {"TensorrtExecutionProvider": 0.95, "CPUExecutionProvider": 0.05},
    )
    assert _placement_warnings(trt, trt_nodes, "TensorrtExecutionProvider") == []


def test_listed_but_unstartable_provider_is_skipped_quietly(monkeypatch, capsys, pair):
    """onnxruntime-gpu without its CUDA libraries: ORT prints "EP Error" and falls back to CPU."""
    import onnxshrink.bench as bench

    real_session = ort.InferenceSession

    def session_falling_back(path, options, providers):
        print("*************** EP Error ***************")
        print("EP Error libcudnn.so.9: cannot open shared object file when using [...]")
        return real_session(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session_falling_back)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(bench, "_preload_gpu_libraries", lambda tensorrt: None)
    report = benchmark([pair[0]], ["cuda"], warmup=1, runs=2)
    assert report.rows == []
    ((provider, reason),) = report.skipped
    assert provider == "cuda"
    assert "CUDAExecutionProvider is listed by onnxruntime but could not be started" in reason
    assert "libcudnn.so.9" in reason and "fell back to CPUExecutionProvider" in reason
    assert "EP Error" not in capsys.readouterr().out


@pytest.mark.zoo
def test_zoo_original_and_optimized_in_one_interleaved_run(tmp_path):
    """PP-OCRv4 rec and its optimized version: both rows, and the ratio says which is faster."""
    from pathlib import Path

    import onnxshrink

    source = Path(__file__).resolve().parents[1] / "models" / "zoo" / "ppocr-v4-rec.onnx"
    if not source.is_file():
        pytest.skip(f"{source} is missing: run `make models`")
    optimized = tmp_path / "rec.opt.onnx"
    shape = {"x": [1, 3, 48, 320]}
    onnxshrink.optimize(source, optimized, input_shapes=shape)
    report = benchmark(
        [str(source), str(optimized)], ["cpu"], input_shapes=shape, warmup=3, runs=20
    )
    original, shrunk = report.rows
    assert (original.model, shrunk.model) == (str(source), str(optimized))
    assert original.ratio == 1.0
    # 860 -> 241 nodes: about 0.55-0.65 of the original's latency on a 2-core machine.
    assert shrunk.ratio < 0.9, (original.p50_ms, shrunk.p50_ms)
    assert shrunk.placement == original.placement == {"CPUExecutionProvider": 1.0}
    assert shrunk.nodes_executed < original.nodes_executed
