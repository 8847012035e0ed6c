"""`optimize --quantize int8` on a real model: the CLI end to end, judged on held-out samples."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from models import data
from onnxshrink.cli import app
from onnxshrink.quant.sensitivity import DEFAULT_MAX_ERROR
from tests.zoo.conftest import model_path, sha256_of

pytestmark = pytest.mark.zoo

MODEL = "ppocr-v4-cls"
SAMPLES = 16


def test_cli_int8_keeps_classifier_agreement(tmp_path):
    source = model_path(MODEL)
    before = sha256_of(source)
    calib = tmp_path / "calib"
    held_out = tmp_path / "eval"
    data.save_npz(data.feeds_for(MODEL, "calib", SAMPLES), calib)
    data.save_npz(data.feeds_for(MODEL, "eval", SAMPLES), held_out)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        ["optimize", str(source), "-o", str(out), "--quantize", "int8",
         "--calibration-data", str(calib), "--inputs", str(held_out), "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sha256_of(source) == before
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    quant = json.loads(report.read_text())["quantization"]
    assert quant["calibration_samples"] == SAMPLES
    # the speed check decides between int8 compute and float compute with int8 weights
    if quant["speed"]["chosen"] == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and quant["layers_quantized"] > 0
        assert out.stat().st_size < 0.8 * source.stat().st_size
    else:  # float compute was faster by the margin; the Gemm still stores int8 weights
        assert "DequantizeLinear" in ops and quant["weight_only"]
        assert quant["speed"]["weights_ms"] < 0.9 * quant["speed"]["int8_ms"]
        assert out.stat().st_size < source.stat().st_size
    check = quant["held_out_check"]
    assert check["held_out"] and check["samples"] == SAMPLES
    agreement = [o["argmax_agreement"] for o in check["outputs"] if o["argmax_agreement"]]
    assert agreement and min(agreement) >= 0.99, check
    assert "argmax agree" in result.output


def test_rec_int8_reads_like_fp32_and_is_small() -> None:
    """ppocr-v5-rec through quantize_int8 at the default budget, judged on held-out lines."""
    import numpy as np

    import onnxshrink
    from onnxshrink.rules.int8 import quantize_int8
    from onnxshrink.verify.parity import ort_session

    name = "ppocr-v5-rec"
    source = model_path(name)
    lossless = onnxshrink.optimize(source, None, input_shapes={"x": [1, 3, 48, 320]}).model
    result = quantize_int8(lossless, data.feeds_for(name, "calib", 32), check_speed=False)
    assert result.budget.within_budget
    assert result.quantize is not None and result.quantize.bias_corrected  # on by default
    x, truth = data.rec_lines(name, "eval", 64)
    classes = data.ctc_classes(name)

    def read(model) -> list[str]:
        sess = ort_session(model)
        probs = [sess.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))]
        return [data.ctc_greedy_decode(p, classes)[0] for p in probs]

    fp32 = read(str(source))
    int8 = read(result.model)
    # the task metric on held-out lines: within 0.5 pt of fp32 (the bench uses 256 lines)
    assert 100 * (data.cer(int8, truth) - data.cer(fp32, truth)) <= 0.5
    assert 100 * data.cer(int8, fp32) <= 1.0  # what quantization changed in the reading
    size = len(result.model.SerializeToString()) / source.stat().st_size
    assert size <= 0.45, size
    assert np.isfinite(result.budget.final_error)


def _mixed_scale_detector(source) -> onnx.ModelProto:
    """The detector with its map concatenated to a copy scaled to box coordinates: one output
    [N, 2, H, W] whose channel 0 is 0..640 and channel 1 the 0..1 probabilities. The small
    part goes through a uint8 Q/DQ of its own, whose dequantization scale the candidate below
    gets wrong."""
    from onnx import helper

    model = onnx.load(str(source))
    graph = model.graph
    (out,) = graph.output
    prob = out.name
    graph.output.remove(out)
    f32 = onnx.TensorProto.FLOAT
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(640.0, np.float32), "mix_scale"),
            onnx.numpy_helper.from_array(np.array(1 / 255, np.float32), "mix_q_scale"),
            onnx.numpy_helper.from_array(np.array(1 / 255, np.float32), "mix_dq_scale"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Mul", [prob, "mix_scale"], ["mix_big"]),
            helper.make_node("QuantizeLinear", [prob, "mix_q_scale"], ["mix_q"]),
            helper.make_node("DequantizeLinear", ["mix_q", "mix_dq_scale"], ["mix_small"]),
            helper.make_node("Concat", ["mix_big", "mix_small"], ["mixed"], axis=1),
        ]
    )
    graph.output.append(helper.make_tensor_value_info("mixed", f32, None))
    if model.opset_import[0].version < 13:
        model.opset_import[0].version = 13
    return model


def test_budget_catches_a_quantization_that_ruins_the_small_part_of_an_output():
    """Issue 8: box-scale and score-scale values in one output; scores ruined, boxes intact."""
    from onnxshrink.quant.sensitivity import ErrorReference

    source = model_path("ppocr-v4-det")
    mixed = _mixed_scale_detector(source)
    ruined = onnx.ModelProto()
    ruined.CopyFrom(mixed)
    for init in ruined.graph.initializer:
        if init.name == "mix_dq_scale":  # a wrong scale: the scores fall 3x (0.47 -> 0.16)
            wrong = np.array(0.33 / 255, np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(wrong, init.name))
    feeds = data.feeds_for("ppocr-v4-det", "calib", 2)
    reference = ErrorReference.from_model(mixed, feeds, 2)
    ref_runs = reference.outputs
    import onnxruntime as ort

    session = ort.InferenceSession(ruined.SerializeToString(), providers=["CPUExecutionProvider"])
    cand_runs = [session.run(None, feed) for feed in reference.feeds]
    noise = sum(float(np.sum((c[0] - r[0]) ** 2)) for r, c in zip(ref_runs, cand_runs, strict=True))
    signal = sum(float(np.sum(r[0] ** 2)) for r in ref_runs)
    assert noise / signal < 1e-3  # the pooled figure: ten times within the default budget
    error = reference.error(ruined, "ruined scores")
    assert error > 10 * DEFAULT_MAX_ERROR  # the figure the budget uses: far over it
    assert reference.error(mixed, "the float model") == 0.0
