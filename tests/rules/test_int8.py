"""int8 end to end: quantize_int8, optimize(quantize="int8"), the CLI and the report section."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import onnxshrink
from onnxshrink.cli import app
from onnxshrink.errors import UsageError
from onnxshrink.quant.lossy import SPEED_RUNS, held_out_check
from onnxshrink.rules.int8 import quantize_int8
from tests.helpers import histogram, make_model

# Two Convs, a depthwise Conv (kept float by rule) and a Gemm: large enough weights to quantize.
_NET = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[1,3,16,16] x) => (float[1,10] y) {
    c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)
    r1 = Relu (c1)
    d = Conv <pads = [1,1,1,1], group = 8> (r1, wd)
    c2 = Conv <pads = [1,1,1,1]> (d, w2, b2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, w3, b3)
}
"""
LAYERS = 4  # Conv, depthwise Conv, Conv, Gemm


def build_net() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return make_model(
        _NET,
        {
            "w1": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "b1": rng.normal(size=8).astype(np.float32),
            "wd": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
            "w2": (rng.normal(size=(16, 8, 3, 3)) * 0.3).astype(np.float32),
            "b2": rng.normal(size=16).astype(np.float32),
            "w3": rng.normal(size=(10, 16)).astype(np.float32),
            "b3": rng.normal(size=10).astype(np.float32),
        },
    )


def _samples(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


@pytest.fixture(autouse=True)
def _int8_compute_always(monkeypatch):
    """Keep int8 compute whatever the speed check measures: on these tiny models float compute
    is as fast, and the tests here are about int8 placement (the speed-aware choice has its own
    test, which sets the margin itself)."""
    import onnxshrink.rules.int8 as int8_module

    monkeypatch.setattr(int8_module, "SPEED_MARGIN", 0.99)


@pytest.fixture
def net_files(tmp_path):
    """(model path, calibration .npz with 8 samples, held-out folder of 4 single-sample .npz)."""
    model = tmp_path / "m.onnx"
    onnx.save(build_net(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_samples(1, 8))
    held_out = tmp_path / "eval"
    held_out.mkdir()
    for i, x in enumerate(_samples(2, 4)):
        np.savez(held_out / f"{i}.npz", x=x[None])
    return model, calib, held_out


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _runner_output(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


# --------------------------------------------------------------------------------------------
# quantize_int8


def test_quantize_int8_writes_qdq_that_ort_loads(net_files):
    _, calib, _ = net_files
    model = build_net()
    result = quantize_int8(model, calib, max_error=1.0)  # a loose budget: everything eligible
    ops = histogram(result.model)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    onnx.checker.check_model(result.model, full_check=True)
    session = ort.InferenceSession(
        result.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(None, {"x": _samples(3, 1)})
    assert y.shape == (1, 10) and np.isfinite(y).all()
    assert histogram(model)["QuantizeLinear"] == 0  # the input model is untouched
    # the layers view covers every Conv/Gemm, with a reason for each float one
    assert len(result.layers) == LAYERS
    assert {layer.op for layer in result.layers} == {"Conv", "Gemm"}
    assert len(result.quantized) == 3
    # the plan as materialized: every layer applied or declined with its reason
    assert result.plan is not None
    assert set(result.plan.applied) == {layer.name for layer in result.quantized}
    assert all("int8" in what for what in result.plan.applied.values())
    assert set(result.plan.declined) == {layer.name for layer in result.kept_float}
    (depthwise,) = result.kept_float
    assert depthwise.precision == "float" and "depthwise" in depthwise.reason
    assert "ort-cpu" in depthwise.reason
    assert result.feeds == 8 and not result.synthetic and result.calibration == str(calib)
    assert result.method == "percentile" and result.target == "ort-cpu"
    # the budget's figure is the written model's error on the calibration samples, re-measured
    from onnxshrink.verify.measure import model_error

    float_session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = [{"x": x[None]} for x in _samples(1, 8)]
    error = model_error(
        [float_session.run(None, f) for f in feeds], [session.run(None, f) for f in feeds]
    )
    assert 0.0 < result.budget.final_error == pytest.approx(error, rel=1e-3)


def test_quantize_int8_tight_budget_keeps_sensitive_layers_float(net_files):
    _, calib, _ = net_files
    result = quantize_int8(build_net(), calib, max_error=0.0, method="minmax")
    sensitive = [layer for layer in result.layers if (layer.reason or "").startswith("sensitive")]
    assert sensitive and all(layer.error is not None for layer in sensitive)
    assert result.budget.final_error == 0.0 and not result.quantized


def test_quantize_int8_random_is_synthetic_and_tensorrt_symmetric():
    result = quantize_int8(build_net(), "random", target="tensorrt", max_error=1.0)
    assert result.synthetic and result.calibration == "random" and result.feeds > 0
    zero_points = [
        t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.UINT8
    ]
    assert not zero_points  # tensorrt: int8 activations, never uint8
    # the depthwise Conv kept float gives TensorRT's profile's reason, not the CPU's
    (depthwise,) = [layer for layer in result.kept_float if "depthwise" in layer.reason]
    assert "tensorrt" in depthwise.reason and "CPU" not in depthwise.reason.upper()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "median"}, "--calibration-method"),
        ({"target": "gpu"}, "--target"),
        ({"provider": "tpu"}, "--calibration-provider"),
        ({"exclude": ["("]}, "--exclude"),
        ({"max_error": -1.0}, "--max-error"),
    ],
)
def test_quantize_int8_bad_settings(net_files, kwargs, message):
    with pytest.raises(UsageError, match=message):
        quantize_int8(build_net(), net_files[1], **kwargs)


def test_held_out_check_figures_match_nsr():
    model = build_net()
    feeds = [{"x": x[None]} for x in _samples(4, 3)]
    check = held_out_check(model, model, feeds, source="feeds", held_out=True)
    assert check.verified and check.samples == 3
    (out,) = check.outputs
    assert out.nsr == 0.0 and out.cosine == pytest.approx(1.0) and out.argmax_agreement == 1.0


# --------------------------------------------------------------------------------------------
# optimize(quantize="int8")


def test_optimize_int8_needs_calibration_data(tmp_path, net_files):
    out = tmp_path / "q.onnx"
    with pytest.raises(UsageError, match="--calibration-data") as info:
        onnxshrink.optimize(net_files[0], out, quantize="int8")
    assert "random" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"quantize": "int3", "calibration_data": "random"},
            "--quantize .int3.: expected one of int8",
        ),
        ({"quantize": "int8", "calibration_data": "random", "calibration_method": "x"}, "method"),
    ],
)
def test_optimize_bad_quantize_settings(tmp_path, net_files, kwargs, message):
    out = tmp_path / "q.onnx"
    with pytest.raises(UsageError, match=message):
        onnxshrink.optimize(net_files[0], out, **kwargs)
    assert not out.exists()


def test_optimize_int8_random_calibration_is_flagged(tmp_path, net_files):
    result = onnxshrink.optimize(
        net_files[0], tmp_path / "q.onnx", quantize="int8", calibration_data="random"
    )
    assert result.quantization.synthetic
    assert any("random inputs" in n and "calibrated" in n for n in result.notes)
    # no --inputs: the check ran on generated inputs, and a note says so
    assert not result.quantized_parity.held_out
    assert any("generated random inputs" in n for n in result.notes)


def test_optimize_int8_held_out_check(tmp_path, net_files):
    model, calib, held_out = net_files
    before = _sha(model)
    out = tmp_path / "q.onnx"
    result = onnxshrink.optimize(
        model, out, quantize="int8", calibration_data=calib, inputs=held_out
    )
    assert _sha(model) == before
    assert result.parity.passed  # the lossless stage, judged as before
    check = result.quantized_parity
    assert check.verified and check.held_out and check.samples == 4
    (y,) = check.outputs
    assert y.cosine > 0.99 and y.snr_db > 20 and y.argmax_agreement is not None
    assert y.nsr == pytest.approx(10 ** (-y.snr_db / 10))
    assert histogram(onnx.load(str(out)))["QuantizeLinear"] > 0
    assert result.after.ops["DequantizeLinear"] > 0


def test_optimize_int8_not_held_out_and_over_budget_notes(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build_net(), str(model))
    data = tmp_path / "same.npz"
    np.savez(data, x=_samples(5, 1))
    result = onnxshrink.optimize(
        model, None, quantize="int8", calibration_data=data, inputs=data, max_error=1.0
    )
    assert not result.quantized_parity.held_out
    assert any("not on held-out data" in n for n in result.notes)
    # a budget of 1.0 passes calibration; the held-out figure is far below it: no warning
    assert not _held_out_warnings(result.notes)


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_int8_writes_qdq_and_report(tmp_path, net_files):
    model, calib, held_out = net_files
    before = _sha(model)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = _runner_output(
        "optimize", str(model), "-o", str(out), "--quantize", "int8",
        "--calibration-data", str(calib), "--inputs", str(held_out), "--report", str(report),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _sha(model) == before
    assert histogram(onnx.load(str(out)))["DequantizeLinear"] > 0
    for text in ("int8 quantization", "layers kept float", "depthwise", "argmax agree", "SNR dB"):
        assert text in result.output
    quant = json.loads(report.read_text())["quantization"]
    assert quant["target"] == "ort-cpu" and quant["method"] == "percentile"
    assert quant["calibration_samples"] == 8 and quant["layers_total"] == LAYERS
    assert [k["op"] for k in quant["kept_float"]] == ["Conv"]
    assert "depthwise" in quant["kept_float"][0]["reason"]
    check = quant["held_out_check"]
    assert check["held_out"] and check["samples"] == 4 and check["outputs"][0]["name"] == "y"


def test_cli_int8_exclude_keeps_convs_float(tmp_path, net_files):
    model, calib, _ = net_files
    out = tmp_path / "q.onnx"
    result = _runner_output(
        "optimize", str(model), "-o", str(out), "--quantize", "int8",
        "--calibration-data", str(calib), "--exclude", "Conv", "--max-error", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    quantized = onnx.load(str(out))
    dq_outputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    for node in quantized.graph.node:
        if node.op_type == "Conv":
            assert not set(node.input) & dq_outputs, f"{node.name} reads a dequantized tensor"
    assert any(n.op_type == "Gemm" and set(n.input) & dq_outputs for n in quantized.graph.node)
    assert "excluded by 'Conv'" in result.output


def test_cli_int8_random_prints_warning(tmp_path, net_files):
    result = _runner_output(
        "optimize", str(net_files[0]), "-o", str(tmp_path / "q.onnx"),
        "--quantize", "int8", "--calibration-data", "random",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: calibrated on random inputs" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "int8"], "--calibration-data"),
        (["--quantize", "int8", "--calibration-data", "absent.npz"], "no such file"),
        (
            ["--quantize", "int3", "--calibration-data", "random"],
            "--quantize 'int3': expected one of",
        ),
        (
            ["--quantize", "int8", "--calibration-data", "random", "--calibration-method", "x"],
            "--calibration-method",
        ),
        (["--quantize", "int8", "--calibration-data", "WRONG"], "no array for model input"),
    ],
)
def test_cli_int8_bad_input_one_line_exit_2(tmp_path, net_files, extra, message):
    model = net_files[0]
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, z=np.zeros((1, 3, 16, 16), np.float32))
    extra = [str(wrong) if e == "WRONG" else str(tmp_path / e) if e.endswith(".npz") else e
             for e in extra]  # fmt: skip
    before = _sha(model)
    out = tmp_path / "q.onnx"
    result = _runner_output("optimize", str(model), "-o", str(out), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1 and result.output.strip().count("\n") == 0
    assert not out.exists()
    assert _sha(model) == before


def test_optimize_int8_warns_when_held_out_error_exceeds_budget(tmp_path):
    # calibrated on small inputs, judged on inputs 100x larger: activations clip, the held-out
    # error is far over a budget that held on the calibration samples
    calib, held_out = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=_samples(1, 8) * np.float32(0.1))
    np.savez(held_out, x=_samples(2, 1) * np.float32(10.0))
    result = onnxshrink.optimize(
        build_net(), quantize="int8", calibration_data=calib, inputs=held_out, max_error=0.01
    )
    assert result.quantization.budget.within_budget
    assert result.quantized_parity.error > 0.01
    (warning,) = _held_out_warnings(result.notes)
    assert "over the budget" in warning


def _held_out_warnings(notes: list[str]) -> list[str]:
    """Warning notes other than the speed check's (a tiny model is often slower in int8)."""
    return [n for n in notes if n.startswith("warning:") and "the result runs" not in n]


def test_speed_aware_placement_keeps_int8_compute_only_when_faster(monkeypatch, net_files):
    import onnxshrink.rules.int8 as int8_module

    _, calib, _ = net_files
    # float compute must win by more than the margin to replace int8 compute: with a margin of
    # -10000% it always does, with 99% never
    monkeypatch.setattr(int8_module, "SPEED_MARGIN", -100.0)
    result = quantize_int8(build_net(), calib, max_error=1.0)
    speed = result.speed
    assert speed is not None and speed.runs == SPEED_RUNS
    assert speed.float_ms > 0 and speed.int8_ms > 0 and speed.weights_ms > 0
    assert speed.chosen == "weights" and speed.result_ms == speed.weights_ms
    assert result.quantized == [] and result.quantize.weight_only  # float compute, int8 weights
    assert histogram(result.model)["QuantizeLinear"] == 0
    assert any("int8 compute ran" in n for n in result.quantize.notes)
    reasons = {layer.name: layer.reason for layer in result.layers}
    assert any("speed check" in (r or "") for r in reasons.values())
    assert result.quantize.weight_only == ["Gemm_7"]  # MatMul/Gemm only: no Conv loses NCHWc
    monkeypatch.setattr(int8_module, "SPEED_MARGIN", 0.99)
    result = quantize_int8(build_net(), calib, max_error=1.0)
    assert result.speed.chosen == "int8" and len(result.quantized) == 3
    # the warning about the result being slower than float follows SPEED_WARN_RATIO
    monkeypatch.setattr(int8_module, "SPEED_WARN_RATIO", 0.0)
    result = quantize_int8(build_net(), calib, max_error=1.0)
    assert any("the result runs" in n for n in result.quantize.notes)
    monkeypatch.setattr(int8_module, "SPEED_WARN_RATIO", float("inf"))
    result = quantize_int8(build_net(), calib, max_error=1.0)
    assert not any("the result runs" in n for n in result.quantize.notes)
    # no timing when asked not to, or for a target this machine cannot run
    assert quantize_int8(build_net(), calib, max_error=1.0, check_speed=False).speed is None
    assert quantize_int8(build_net(), calib, max_error=1.0, target="tensorrt").speed is None


def test_inputs_npz_with_many_samples_is_split_into_batches(tmp_path):
    # one .npz of 5 samples for a batch-1 model: 5 runs, for the lossless and the int8 checks
    held_out = tmp_path / "eval.npz"
    np.savez(held_out, x=_samples(7, 5))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_samples(1, 8))
    result = onnxshrink.optimize(
        build_net(), quantize="int8", calibration_data=calib, inputs=held_out, max_error=1.0
    )
    assert result.parity.samples == 5
    assert result.quantized_parity.verified and result.quantized_parity.samples == 5


def test_ort_cuda_target_gives_float_compute_with_int8_weights(net_files):
    model_path, calib, held_out = net_files
    result = quantize_int8(build_net(), calib, target="ort-cuda")
    assert result.quantized == [] and result.speed is None  # no CPU timing for a GPU target
    assert len(result.quantize.weight_only) == LAYERS  # every weight, depthwise included
    assert result.quantize.bias_corrected  # the Convs with group 1 and the Gemm
    assert histogram(result.model)["QuantizeLinear"] == 0
    assert result.budget.within_budget
    out = model_path.parent / "cuda.onnx"
    cli = _runner_output(
        "optimize", str(model_path), "-o", str(out), "--quantize", "int8", "--target", "ort-cuda",
        "--calibration-data", str(calib), "--inputs", str(held_out),
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert out.stat().st_size < 0.5 * model_path.stat().st_size


# --------------------------------------------------------------------------------------------
# Bounded, streaming calibration (issue 8)

_DYNAMIC_NET = _NET.replace("float[1,3,16,16] x", "float[N,3,16,16] x").replace(
    "float[1,10] y", "float[N,10] y"
)


def build_dynamic_net() -> onnx.ModelProto:
    model = build_net()
    dynamic = make_model(
        _DYNAMIC_NET, {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    )
    return dynamic


def test_calibration_npz_runs_in_batches_and_float_model_runs_once(tmp_path, monkeypatch) -> None:
    """64 samples in one .npz for a dynamic-batch model: 8 runs of 8, never one run of 64, and
    the budget's reference comes from the statistics pass (the float model is not run again)."""
    import onnxshrink.quant.calibration as calibration_module
    from onnxshrink.quant.sensitivity import ErrorReference

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_samples(1, 64))
    sizes: list[int] = []
    real_observe = calibration_module._observe  # what collect_statistics calls

    def spying_observe(model, names, feeds, *args, **kwargs):
        def spied():
            for feed in feeds:
                sizes.append(feed["x"].shape[0])
                yield feed

        return real_observe(model, names, spied(), *args, **kwargs)

    monkeypatch.setattr(calibration_module, "_observe", spying_observe)

    def forbidden(*args, **kwargs):
        raise AssertionError("the float model ran a second time for the budget's reference")

    monkeypatch.setattr(ErrorReference, "from_model", classmethod(forbidden))
    result = quantize_int8(build_dynamic_net(), calib, max_error=0.05)
    assert sizes == [8] * 8
    assert result.feeds == 8 and result.samples == 64 and result.batch == 8
    assert set(result.timings) == {"statistics", "sensitivity", "speed check"}
    assert all(seconds > 0 for seconds in result.timings.values())
    small = quantize_int8(build_dynamic_net(), calib, max_error=0.05, calibration_batch=3)
    assert small.feeds == 22 and small.samples == 64  # 21 runs of 3 and one of 1


def test_loader_feeds_and_feed_lists_are_cut_to_the_batch(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    yield {'x': np.random.default_rng(0).normal(size=(20, 3, 16, 16)).astype(np.float32)}\n"
    )
    result = quantize_int8(build_dynamic_net(), str(script), max_error=1.0, check_speed=False)
    assert result.feeds == 3  # 8 + 8 + 4
    listed = quantize_int8(
        build_dynamic_net(), [{"x": _samples(4, 10)}], max_error=1.0, check_speed=False
    )
    assert listed.feeds == 2 and listed.samples == 10
    with pytest.raises(UsageError, match="calibration-batch"):
        quantize_int8(build_dynamic_net(), [{"x": _samples(4, 2)}], calibration_batch=0)


def test_held_out_check_reports_a_task_metric(tmp_path):
    module = tmp_path / "task_metric.py"
    module.write_text(
        "import numpy as np\n"
        "def flips(ref, cand):\n"
        "    return float(np.mean(ref['y'].argmax(-1) != cand['y'].argmax(-1)))\n"
        "def broken(ref, cand):\n"
        "    raise RuntimeError('no labels here')\n"
    )
    from onnxshrink.verify.measure import load_metric

    model = build_net()
    feeds = [{"x": x[None]} for x in _samples(5, 6)]
    same = held_out_check(
        model, model, feeds, source="t", held_out=True, metric=load_metric(f"{module}:flips")
    )
    assert same.metric == f"{module}:flips" and same.metric_value == 0.0
    quantized = quantize_int8(model, [{"x": x[None]} for x in _samples(1, 8)], max_error=1.0)
    check = held_out_check(
        model,
        quantized.model,
        feeds,
        source="t",
        held_out=True,
        metric=load_metric(f"{module}:flips"),
    )
    assert check.metric_value is not None and 0.0 <= check.metric_value <= 1.0
    with pytest.raises(UsageError, match="broken.*failed on batch 0: no labels"):
        held_out_check(
            model, model, feeds, source="t", held_out=True, metric=load_metric(f"{module}:broken")
        )
    for spec, message in [
        ("nomodule_xyz:fn", "cannot import"),
        (f"{module}:missing", "defines no function"),
        ("justtext", "expected module:function"),
        (f"{tmp_path}/none.py:fn", "no such file"),
    ]:
        with pytest.raises(UsageError, match=message):
            load_metric(spec)


def test_cli_calibration_batch_and_metric(tmp_path, net_files):
    model, calib, held_out = net_files
    dynamic = tmp_path / "dyn.onnx"
    onnx.save(build_dynamic_net(), str(dynamic))
    big = tmp_path / "calib64.npz"
    np.savez(big, x=_samples(1, 64))
    metric = tmp_path / "m.py"
    metric.write_text("def zero(ref, cand):\n    return 0.0\n")
    out = tmp_path / "q.onnx"
    result = _runner_output(
        "optimize", str(dynamic), "-o", str(out), "--quantize", "int8",
        "--calibration-data", str(big), "--calibration-batch", "16", "--inputs", str(held_out),
        "--metric", f"{metric}:zero", "--max-error", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "64 sample(s) in 4 run(s) of at most 16" in result.output
    assert "--metric" in result.output and "time: statistics" in result.output
    bad = _runner_output(
        "optimize", str(dynamic), "-o", str(tmp_path / "b.onnx"), "--quantize", "int8",
        "--calibration-data", str(big), "--metric", "nope",
    )  # fmt: skip
    assert bad.exit_code == 2 and "--metric 'nope'" in bad.output
    assert not (tmp_path / "b.onnx").exists()


# --------------------------------------------------------------------------------------------
# Transformers: smoothing and int8 embedding tables (module docstring 3a-3c)

_OUTLIER_NET = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (int64[N,6] ids) => (float[N,6,8] y) {
    e = Gather (table, ids)
    h = MatMul (e, w1)
    r = Relu (h)
    y = MatMul (r, w2)
}
"""


def _outlier_net() -> onnx.ModelProto:
    """An embedding whose channel 0 is 60x the others (as a LayerNorm output's outliers), then
    two MatMuls: the first one's per-tensor activation scale starves the other channels."""
    rng = np.random.default_rng(3)
    table = rng.normal(0, 1, (5000, 16)).astype(np.float32)
    table[:, 0] *= 60.0
    return make_model(
        _OUTLIER_NET,
        {
            "table": table,
            "w1": rng.normal(0, 0.3, (16, 32)).astype(np.float32),
            "w2": rng.normal(0, 0.3, (32, 8)).astype(np.float32),
        },
    )


def test_smoothing_is_chosen_when_it_lowers_the_error_and_tables_go_int8():
    model = _outlier_net()
    rng = np.random.default_rng(4)
    feeds = [{"ids": rng.integers(0, 5000, (4, 6)).astype(np.int64)} for _ in range(8)]
    plain = quantize_int8(model, feeds, max_error=1.0, check_speed=False, smoothing=False)
    smoothed = quantize_int8(model, feeds, max_error=1.0, check_speed=False)
    assert smoothed.budget.full_error < plain.budget.full_error / 2
    assert any("activation smoothing" in n for n in smoothed.notes)
    assert not any("activation smoothing" in n for n in plain.notes)
    ops = histogram(smoothed.model)
    assert ops["Mul"] >= 2  # the smoothing Mul and the table's row scales
    # the 5000x16 table is stored int8 per row, read through Gather -> Cast -> Mul
    tables = [t for t in smoothed.model.graph.initializer if t.dims == [5000, 16]]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]
    assert any("Gather table(s) stored int8" in n for n in smoothed.notes)
    onnx.checker.check_model(smoothed.model, full_check=True)
    # TensorRT keeps float tables (no weight-only storage there), smoothing still applies
    trt = quantize_int8(model, feeds, max_error=1.0, target="tensorrt", check_speed=False)
    assert not any(t.data_type == onnx.TensorProto.INT8 and t.dims == [5000, 16]
                   for t in trt.model.graph.initializer)  # fmt: skip
