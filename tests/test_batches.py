"""Samples and batches (issue 12, 1): every command reads axis 0 of an .npz as samples, one per
entry, and runs them in batches it chooses (or `--batch N`), whatever the model's batch dim."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.verify.parity import BATCH_HELP, ort_failure
from tests.helpers import dense_net, sample_file

runner = CliRunner()


def _run(*args: object):
    result = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert "Traceback" not in result.output, result.output
    return result


def _flat(text: str) -> str:
    """`text` with its line wrapping undone (rich wraps long lines off a terminal)."""
    return " ".join(text.split())


@pytest.fixture
def dynamic(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(dense_net(), str(path))
    return path


@pytest.fixture
def pinned(tmp_path):
    path = tmp_path / "b1.onnx"
    onnx.save(dense_net(1), str(path))
    return path


@pytest.fixture
def one_sample(tmp_path):
    """Declares a dynamic batch, fails on more than one sample."""
    path = tmp_path / "one.onnx"
    onnx.save(dense_net(takes_one_sample=True), str(path))
    return path


def test_128_samples_count_as_128_in_parity_and_optimize(tmp_path, dynamic):
    calib = sample_file(tmp_path / "calib.npz", 128, seed=1)
    held = sample_file(tmp_path / "held.npz", 128, seed=2)
    parity = _run("parity", dynamic, dynamic, "--inputs", held)
    assert parity.exit_code == 0, parity.output
    assert "128 input sample(s) in 16 run(s)" in _flat(parity.stdout)

    result = _run(
        "optimize", dynamic, "-o", tmp_path / "q.onnx", "--quantize", "int8",
        "--calibration-data", calib, "--inputs", held, "--max-error", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "128 sample(s) in 16 run(s) of at most 8" in _flat(result.stdout)  # calibration
    assert (
        "parity vs original (lossless stage, before int8): ONNX Runtime CPU, 128 input "
        "sample(s) in 16 run(s)" in _flat(result.stdout)
    )
    assert "(held-out, 128 input sample(s) in 16 run(s))" in _flat(result.stdout)


def test_optimize_batch_sets_every_run(tmp_path, dynamic):
    calib = sample_file(tmp_path / "calib.npz", 128, seed=1)
    held = sample_file(tmp_path / "held.npz", 40, seed=2)
    result = _run(
        "optimize", dynamic, "-o", tmp_path / "q.onnx", "--quantize", "int8",
        "--calibration-data", calib, "--inputs", held, "--max-error", "1", "--batch", "32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "128 sample(s) in 4 run(s) of at most 32" in _flat(result.stdout)
    assert "40 input sample(s) in 2 run(s)" in _flat(result.stdout)


def test_every_command_has_the_same_batch_option():
    from typer.main import get_command

    commands = get_command(app).commands
    for name in ("optimize", "parity", "bench"):
        option = next(p for p in commands[name].params if "--batch" in p.opts)
        assert option.help == BATCH_HELP and "one sample per entry" in option.help


def test_bench_times_one_batch_of_the_file(tmp_path, dynamic, pinned):
    held = sample_file(tmp_path / "held.npz", 128)
    report = _run("bench", dynamic, "--inputs", held, "--runs", "2", "--warmup", "0", "--json", "-")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["rows"][0]["samples"] == 8  # at most 8, not 128
    report = _run(
        "bench", dynamic, "--inputs", held, "--batch", "3", "--runs", "2", "--warmup", "0",
        "--json", "-",
    )  # fmt: skip
    assert json.loads(report.stdout)["rows"][0]["samples"] == 3


def test_model_pinned_to_batch_1_takes_an_n_sample_file(tmp_path, pinned):
    held = sample_file(tmp_path / "held.npz", 8)
    parity = _run("parity", pinned, pinned, "--inputs", held)
    assert parity.exit_code == 0, parity.output
    assert "8 input sample(s) on" in _flat(parity.stdout)  # 8 runs of one

    bench = _run("bench", pinned, "--inputs", held, "--runs", "2", "--warmup", "0", "--json", "-")
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["rows"][0]["samples"] == 1

    out = tmp_path / "o.onnx"
    result = _run(
        "optimize", pinned, "-o", out, "--inputs", held, "--bench", "--bench-runs", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pass --input-shape or --inputs" not in result.output
    assert "8 input sample(s)" in _flat(result.stdout) and str(out) in _flat(result.stdout)
    assert "vs first" in _flat(result.stdout)  # both models timed

    refused = _run("optimize", pinned, "-o", tmp_path / "r.onnx", "--batch", "4")
    assert refused.exit_code == 2
    assert "--batch 4: the model's batch size is fixed at 1" in refused.output


def test_parity_names_a_batch_the_model_rejects(tmp_path, one_sample):
    held = sample_file(tmp_path / "held.npz", 8)
    result = _run("parity", one_sample, one_sample, "--inputs", held)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    line = _flat(result.stderr)
    assert "a run of 8 samples" in line and "pass --batch 1" in line
    assert "cannot be reshaped to the requested shape" in line  # ORT's reason, not cut off
    assert "[ONNXRuntimeError]" not in line and "0 run(s)" not in line
    assert "pass --input-shape or --inputs" not in line

    fixed = _run("parity", one_sample, one_sample, "--inputs", held, "--batch", "1")
    assert fixed.exit_code == 0, fixed.output
    assert "8 input sample(s) on" in _flat(fixed.stdout)

    bench = _run("bench", one_sample, "--inputs", held, "--runs", "1", "--warmup", "0")
    assert bench.exit_code == 1 and "pass --batch 1" in _flat(bench.stderr)

    opt = _run("optimize", one_sample, "-o", tmp_path / "o.onnx", "--inputs", held)
    assert opt.exit_code == 2 and "pass --batch 1" in _flat(opt.stderr)
    ok = _run("optimize", one_sample, "-o", tmp_path / "o.onnx", "--inputs", held, "--batch", "1")
    assert ok.exit_code == 0, ok.output


def test_ort_failure_keeps_the_reason_on_one_line():
    session = ort.InferenceSession(
        dense_net(1).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    import numpy as np

    with pytest.raises(Exception) as caught:
        session.run(None, {"x": np.zeros((2, 16), np.float32)})
    text = ort_failure(caught.value)
    assert "\n" not in text and "index: 0 Got: 2 Expected: 1" in text
    assert not text.startswith("[ONNXRuntimeError]")


@pytest.mark.skipif(
    "TensorrtExecutionProvider" in ort.get_available_providers(),
    reason="needs an ONNX Runtime without TensorRT, so that --bench cannot time on it",
)
def test_optimize_bench_that_times_nothing_is_not_exit_0(tmp_path, dynamic):
    out = tmp_path / "o.onnx"
    result = _run("optimize", dynamic, "-o", out, "--bench", "--bench-provider", "tensorrt")
    assert result.exit_code == 3, result.output
    assert out.exists()  # written and verified; the timing asked for is missing
    assert "warning: --bench could not time on tensorrt" in _flat(result.stderr)
    assert "--bench did not time every model" in _flat(result.stderr)


def test_a_file_that_does_not_fit_is_not_told_to_pass_inputs(tmp_path, pinned):
    import numpy as np

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((8, 5), np.float32))  # 5 features, the model takes 16
    for args in (("parity", pinned, pinned), ("bench", pinned, "--runs", "1")):
        result = _run(*args, "--inputs", wrong)
        assert result.exit_code in (1, 2)
        text = _flat(result.stderr)
        assert "index: 1 Got: 5 Expected: 16" in text
        assert "--input-shape or --inputs" not in text and "--batch 1" not in text


def test_calibration_on_a_batch_1_model_runs_one_sample_each(tmp_path, pinned):
    calib = sample_file(tmp_path / "calib.npz", 8, seed=1)
    held = sample_file(tmp_path / "held.npz", 8, seed=2)
    result = _run(
        "optimize", pinned, "-o", tmp_path / "q.onnx", "--quantize", "int8",
        "--calibration-data", calib, "--inputs", held, "--max-error", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 sample(s) in 8 run(s) of 1 from" in _flat(result.stdout)
