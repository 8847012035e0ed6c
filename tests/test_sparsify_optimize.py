"""`optimize(sparsify=...)` and `--sparsify`: pruning through the whole command (issue 11),
alone and chained with `--quantize` (`onnxshrink.quant.lossy.ChainedStage`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.engine.io import array_of
from onnxshrink.engine.optimize import optimize
from onnxshrink.quant.sparsity import DEFAULT_SPARSIFY_MAX_ERROR
from onnxshrink.rules.prune_magnitude import follows_nm
from tests.helpers import run

D = 64


def _mlp() -> onnx.ModelProto:
    """x [b, 64] -> MatMul -> Relu -> MatMul -> y: two 64x64 weights (4096 values each)."""
    rng = np.random.default_rng(0)
    w = [(rng.standard_normal((D, D)) / 8).astype(np.float32) for _ in range(2)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
            helper.make_node("Relu", ["h"], ["r"], name="act"),
            helper.make_node("MatMul", ["r", "w1"], ["y"], name="fc1"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", D])],
        [numpy_helper.from_array(w[0], "w0"), numpy_helper.from_array(w[1], "w1")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _feeds(seed: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, D)).astype(np.float32)} for _ in range(n)]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: array_of(t) for t in model.graph.initializer if len(t.dims) == 2}


def test_unstructured_through_optimize_prunes_and_reports_a_pruning_stage() -> None:
    model = _mlp()
    result = optimize(
        model, sparsify="unstructured:0.5", calibration_data=_feeds(0), max_error=10.0,
        inputs=_feeds(1),
    )  # fmt: skip
    stage = result.quantization
    assert stage is not None and stage.family == "pruning" and stage.kept_as == "dense"
    assert stage.stage == "unstructured:0.5"
    assert {u.name for u in stage.quantized} == {"fc0", "fc1"}
    for w in _weights(result.model).values():
        assert np.mean(w == 0) == pytest.approx(0.5, abs=0.01)
    assert np.array_equal(array_of(model.graph.initializer[0]), _weights(_mlp())["w0"])  # kept
    assert result.quantized_parity is not None and result.quantized_parity.held_out


def test_default_budget_is_the_pruning_one() -> None:
    result = optimize(_mlp(), sparsify="2:4", calibration_data=_feeds(0), inputs=_feeds(1))
    assert result.quantization is not None
    assert result.quantization.budget.max_error == DEFAULT_SPARSIFY_MAX_ERROR
    for name in result.quantization.plan.applied if result.quantization.plan else []:
        assert name in {"fc0", "fc1"}
    for w in _weights(result.model).values():  # pruned ones follow 2:4 along K (axis 0)
        if np.any(w == 0):
            assert follows_nm(w, 2, 4, axis=0)


def test_without_calibration_data_pruning_uses_random_inputs_and_says_so() -> None:
    result = optimize(_mlp(), sparsify="unstructured:0.5", max_error=10.0, inputs=_feeds(1))
    assert result.quantization is not None and result.quantization.synthetic
    assert any("magnitude" in note for note in result.quantization.notes)
    assert any(note.startswith("pruned without real calibration data") for note in result.notes)


def test_pruning_then_int8_chains_both_and_measures_the_whole() -> None:
    result = optimize(
        _mlp(), sparsify="unstructured:0.5", quantize="int8", calibration_data=_feeds(0),
        max_error=10.0, inputs=_feeds(1), check_speed=False,
    )  # fmt: skip
    stage = result.quantization
    assert stage is not None
    assert stage.stage == "unstructured:0.5 + int8"
    assert [s.stage for s in stage.stages] == ["unstructured:0.5", "int8"]
    assert {u.precision for u in stage.quantized} >= {"sparse 50%", "int8"}
    assert any("both" in note for note in stage.notes)  # the error against the float model
    assert stage.budget.max_error == pytest.approx(20.0)
    assert "QuantizeLinear" in {n.op_type for n in result.model.graph.node}


def test_compress_packs_weights_with_the_same_outputs() -> None:
    feeds = _feeds(1)
    plain = optimize(
        _mlp(), sparsify="unstructured:0.5", calibration_data=_feeds(0), max_error=10.0,
        inputs=feeds,
    )  # fmt: skip
    packed = optimize(
        _mlp(), sparsify="unstructured:0.5", calibration_data=_feeds(0), max_error=10.0,
        inputs=feeds, compress=True,
    )  # fmt: skip
    assert packed.model.ByteSize() < 0.7 * plain.model.ByteSize()
    onnx.checker.check_model(packed.model, full_check=True)
    for feed in feeds:
        np.testing.assert_array_equal(run(packed.model, feed)[0], run(plain.model, feed)[0])


def test_cli_prints_a_pruning_section(tmp_path) -> None:
    source, out, calib = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "c.npz"
    onnx.save(_mlp(), source)
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, D)).astype(np.float32))
    result = CliRunner().invoke(
        app,
        ["optimize", str(source), "-o", str(out), "--sparsify", "unstructured:0.5",
         "--calibration-data", str(calib), "--max-error", "10"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "unstructured:0.5 pruning" in result.output and out.exists()


def test_compress_after_int8_says_nothing_was_left_to_pack() -> None:
    result = optimize(
        _mlp(), sparsify="unstructured:0.5", quantize="int8", compress=True,
        calibration_data=_feeds(0), max_error=10.0, inputs=_feeds(1), check_speed=False,
    )  # fmt: skip
    assert result.quantization is not None
    assert any("nothing packed" in note for note in result.quantization.notes)
    assert "QuantizeLinear" in {n.op_type for n in result.model.graph.node}
