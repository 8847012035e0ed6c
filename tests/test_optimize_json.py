"""`optimize --json` and `optimize --bench` with a lossy stage (issue 12, items 3 and 4): every
figure of the run in one object; three timed rows (original, lossless fp32, result), each
with its input shapes; a peak-memory figure that memory freed earlier cannot hide."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnxshrink
from onnxshrink.cli import app
from tests.rules.test_int8 import _samples, build_net

runner = CliRunner()


@pytest.fixture
def net(tmp_path):
    """The tiny int8 test net on disk, with calibration and held-out samples."""
    model = tmp_path / "net.onnx"
    onnx.save_model(build_net(), str(model))
    calib, held_out = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=_samples(1, 8))
    np.savez(held_out, x=_samples(2, 1))  # one sample: the net is pinned to batch 1
    return model, calib, held_out


def _optimize_int8(tmp_path, net, *extra: str):
    model, calib, held_out = net
    result = runner.invoke(
        app,
        [
            "optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--quantize", "int8",
            "--calibration-data", str(calib), "--inputs", str(held_out), "--no-speed-check",
            *extra,
        ],
    )  # fmt: skip
    assert "Traceback" not in result.output
    return result


def test_json_to_stdout_holds_every_figure(tmp_path, net):
    result = _optimize_int8(tmp_path, net, "--bench", "--bench-runs", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # only the JSON on stdout: it parses whole
    assert data["command"] == "optimize" and data["command_line"].startswith("onnxshrink ")
    assert data["output"] == str(tmp_path / "out.onnx")
    before, after = data["summary"]["before"], data["summary"]["after"]
    assert before["bytes"] > 0 and after["nodes"] > 0 and "bytes" in data["summary"]["change_pct"]
    ops = {row["op"]: row for row in data["ops"]}
    assert ops["QuantizeLinear"]["before"] == 0 and ops["QuantizeLinear"]["after"] > 0
    assert [o["name"] for o in data["parity"]["outputs"]] == ["y"]
    assert data["parity"]["outputs"][0]["max_rel"] >= 0
    quant = data["quantization"]
    assert quant["stage"] == "int8" and quant["budget"]["max_error"] > 0
    check = quant["held_out_check"]
    assert check["held_out"] and check["samples"] >= 1 and check["outputs"][0]["cosine"] > 0.5
    head = data["headline"]
    assert head["model"] == "lossy" and head["error"] == check["error"]
    assert head["ok"] == (check["error"] <= quant["budget"]["max_error"])
    rows = data["bench"]["rows"]
    assert [r["role"] for r in rows] == ["original", "lossless", "result"]
    assert all(r["input_shapes"] == {"x": [1, 3, 16, 16]} for r in rows)
    assert all(r["p50_ms"] > 0 and r["runs"] == 2 for r in rows)
    phases = data["phase_seconds"]
    assert {"optimize", "statistics", "bench"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert "p50 ms" in result.stderr  # the tables still printed, on stderr
    assert not (tmp_path / "lossless.onnx").exists()


def test_json_to_a_file_and_the_tables_on_stdout(tmp_path, net):
    dest = tmp_path / "run.json"
    result = _optimize_int8(tmp_path, net, "--json", str(dest))
    assert result.exit_code == 0, result.output
    assert "int8 quantization" in result.stdout and f"json: {dest}" in result.stdout
    data = json.loads(dest.read_text())
    assert data["bench"] is None and data["headline"]["stage"] == "int8"
    assert "bench" not in data["phase_seconds"]


def test_json_in_a_missing_folder_fails_before_any_work(tmp_path, net):
    result = _optimize_int8(tmp_path, net, "--json", str(tmp_path / "nope" / "run.json"))
    assert result.exit_code == 2
    assert "does not exist" in result.output and not (tmp_path / "out.onnx").exists()


def test_lossless_output_is_the_fp32_model_before_the_stage(tmp_path, net):
    model, calib, _ = net
    lossless = tmp_path / "lossless.onnx"
    result = onnxshrink.optimize(
        model,
        tmp_path / "out.onnx",
        quantize="int8",
        calibration_data=calib,
        check_speed=False,
        lossless_output=lossless,
    )
    assert result.lossless_path == lossless
    ops = {n.op_type for n in onnx.load(str(lossless)).graph.node}
    assert "QuantizeLinear" not in ops and "Conv" in ops
    assert "QuantizeLinear" in {n.op_type for n in result.model.graph.node}
    # without a lossy stage there is no separate lossless model
    plain = onnxshrink.optimize(model, tmp_path / "plain.onnx", lossless_output=tmp_path / "l2")
    assert plain.lossless_path is None and not (tmp_path / "l2").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and glibc")
def test_peak_memory_is_not_hidden_by_memory_freed_earlier():
    """Memory freed earlier stays resident in the C heap's free lists, and new allocations
    reuse it without raising the resident figure (issue 12: "peak MB 0.29" for a model that
    needs tens of MB); the meter hands it back first."""
    import ctypes

    from onnxshrink.bench import _HostMemory, _trim_heap

    if not _trim_heap():
        pytest.skip("no glibc malloc_trim")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunk, count = 64 * 1024, 800  # 50 MB in pieces below the mmap threshold: heap memory

    def allocate() -> list[int]:
        blocks = [libc.malloc(chunk) for _ in range(count)]
        for block in blocks:
            ctypes.memset(block, 1, chunk)  # touch every page
        return blocks

    earlier = allocate()  # memory the process used and freed before, below a block still
    pin = earlier.pop()  # in use at the heap's top, so free() cannot hand it back itself
    for block in earlier:
        libc.free(block)
    meter = _HostMemory()
    meter.start()
    blocks = allocate()
    peak_mb, source = meter.stop()
    for block in [*blocks, pin]:
        libc.free(block)
    if peak_mb is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert peak_mb > 0.6 * chunk * count / 2**20, peak_mb
    assert source and "trimmed" in source
