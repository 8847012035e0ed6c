"""GPU paths of `onnxshrink bench`: CUDA (and TensorRT when it starts), with IOBinding.

Every test skips, saying why, where onnxruntime offers no CUDAExecutionProvider (the CPU wheel,
or no GPU). `bench/gpu_check.sh` sets up a venv where they run.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxshrink.bench import benchmark
from tests.helpers import make_model

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="onnxruntime offers no CUDAExecutionProvider here "
    f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a machine "
    "with an NVIDIA GPU (bench/gpu_check.sh)",
)


def _conv_model(path) -> str:
    rng = np.random.default_rng(0)
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N,8,32,32] x) => (float[N,16,32,32] y) {
            c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)
            r1 = Relu (c1)
            c2 = Conv <pads = [1,1,1,1]> (r1, w2, b2)
            y = Relu (c2)
        }
        """,
        {
            "w1": rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32),
            "b1": rng.normal(0, 0.1, 16).astype(np.float32),
            "w2": rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32),
            "b2": rng.normal(0, 0.1, 16).astype(np.float32),
        },
    )
    onnx.save_model(model, str(path))
    return str(path)


def _require_row(report, provider: str):
    rows = [r for r in report.rows if r.provider == provider]
    if not rows:
        reasons = "; ".join(reason for p, reason in report.skipped if p == provider)
        pytest.skip(f"{provider} did not run here: {reasons}")
    return rows[0]


def test_cuda_with_iobinding_runs_on_cuda(tmp_path):
    path = _conv_model(tmp_path / "conv.onnx")
    report = benchmark([path], ["cuda"], warmup=2, runs=5, iobinding=True, batch=2)
    row = _require_row(report, "cuda")
    assert row.session_providers[0] == "CUDAExecutionProvider"
    assert row.placement.get("CUDAExecutionProvider", 0.0) > 0.5, row.placement
    assert not any("ran on" in w for w in row.warnings), row.warnings
    assert row.p50_ms > 0 and row.samples == 2
    assert report.environment.gpu  # NVML named the device


def test_cuda_and_cpu_interleaved_ratio(tmp_path):
    path = _conv_model(tmp_path / "conv.onnx")
    report = benchmark([path, path], ["cpu", "cuda"], warmup=1, runs=5)
    assert {r.provider for r in report.rows} >= {"cpu"}
    cuda_rows = [r for r in report.rows if r.provider == "cuda"]
    if cuda_rows:
        assert cuda_rows[0].ratio == 1.0
        assert cuda_rows[1].ratio == pytest.approx(cuda_rows[1].p50_ms / cuda_rows[0].p50_ms)


def test_quantized_model_fallback_is_reported(tmp_path):
    """QLinearConv has no CUDA kernel in ORT: when it lands on CPU, the row must say so."""
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        q (uint8[1,4,8,8] x) => (uint8[1,4,8,8] y) {
            y = QLinearConv <pads = [1,1,1,1]> (x, xs, xz, w, ws, wz, ys, yz)
        }
        """,
        {
            "xs": np.array(0.02, np.float32),
            "xz": np.array(128, np.uint8),
            "w": np.ones((4, 4, 3, 3), np.uint8),
            "ws": np.array(0.01, np.float32),
            "wz": np.array(0, np.uint8),
            "ys": np.array(0.05, np.float32),
            "yz": np.array(128, np.uint8),
        },
    )
    path = tmp_path / "q.onnx"
    onnx.save_model(model, str(path))
    report = benchmark([str(path)], ["cuda"], warmup=1, runs=3)
    row = _require_row(report, "cuda")
    assert row.quantized
    fell_back = row.placement.get("CPUExecutionProvider", 0.0) > 0
    assert fell_back == any("quantized model" in w for w in row.warnings), row.warnings
    if fell_back:
        assert "QLinearConv" in row.fallback_ops


def test_tensorrt_when_it_starts(tmp_path):
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorrtExecutionProvider")
    path = _conv_model(tmp_path / "conv.onnx")
    report = benchmark(
        [path], ["tensorrt"], warmup=2, runs=5, iobinding=True, batch=1, trt_cache=tmp_path / "trt"
    )
    row = _require_row(report, "tensorrt")
    assert row.session_providers[0] == "TensorrtExecutionProvider"
    assert row.placement.get("TensorrtExecutionProvider", 0.0) > 0, row.placement
    assert any((tmp_path / "trt").iterdir()), "no engine written to the cache folder"
