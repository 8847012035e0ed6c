"""`optimize --quantize int8` on a real model: the CLI end to end, judged on held-out samples."""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from models import data
from onnxshrink.cli import app
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
    from onnxshrink.int8 import quantize_int8
    from onnxshrink.parity import ort_session

    name = "ppocr-v5-rec"
    source = model_path(name)
    lossless = onnxshrink.optimize(source, None, input_shapes={"x": [1, 3, 48, 320]}).model
    result = quantize_int8(lossless, data.feeds_for(name, "calib", 32), check_speed=False)
    assert result.budget.within_budget
    assert result.quantize.bias_corrected  # bias correction is on by default
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
