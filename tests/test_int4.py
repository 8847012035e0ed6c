"""rules/int4.py: block-wise 4-bit weights (issue 10), on tiny models built here."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
import onnxshrink.rules.int4 as int4
from onnxshrink.errors import UsageError
from onnxshrink.quant.lossy import StageSettings
from onnxshrink.quant.targets import target_profile


def _model(k: int = 128, n: int = 48, vocab: int = 300, gemm: bool = False, seed: int = 0):
    """Gather (embedding table [vocab, k]) -> MatMul [k, n] (or Gemm with transB and bias)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, k)).astype(np.float32)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "table")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed")]
    if gemm:
        inits += [
            numpy_helper.from_array(weight.T.copy(), "w"),
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
        ]
        nodes.append(helper.make_node("Gemm", ["emb", "w", "b"], ["y"], name="proj", transB=1))
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _job(target: str = "ort-cpu", **settings):
    settings.setdefault("accuracy_level", 0)  # float compute: the exact dequantized result
    settings.setdefault("int4_method", "rtn")  # no calibration data here
    return int4._Int4Job(StageSettings(target=target, **settings), ())


def _run(model: onnx.ModelProto, ids: np.ndarray, optimized: bool = True) -> np.ndarray:
    """The model's output on ORT CPU; `optimized=False` turns ORT's graph rewrites off (it fuses
    blocked DequantizeLinear + MatMul into MatMulNBits computing on int8 activations)."""
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"ids": ids})[0]


def test_nibbles_pack_low_first_and_unpack():
    codes = np.array([[1, 2, 3], [15, 0, 7]], np.uint8)
    packed = int4.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x07]]
    assert int4.unpack_nibbles(packed, 3).tolist() == codes.tolist()
    signed = np.array([-8, 7, -1, 0], np.int8)
    assert int4.unpack_nibbles(int4.pack_nibbles(signed), 4, signed=True).tolist() == [-8, 7, -1, 0]


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gemm", [False, True])
def test_both_formats_compute_with_the_dequantized_weights(target, symmetric, gemm):
    """MatMulNBits/GatherBlockQuantized (ort-cpu) and blocked DequantizeLinear (tensorrt) give
    what the scheme's own dequantized weights give, and differ from float by int4 rounding."""
    model = _model(k=96 if not gemm else 128, gemm=gemm)  # 96: a last block of 32 after 64
    job = _job(target, symmetric=symmetric)
    plan = job.plan(model, target_profile(target), ())
    assert set(plan.applied) == {"embed", "proj"}
    built, notes = job.materialize(model, plan)
    ops = [n.op_type for n in built.graph.node]
    if target == "ort-cpu":
        assert ops == ["GatherBlockQuantized", "MatMulNBits"] and "MatMulNBits" in notes[0]
    else:
        assert ops == [
            "DequantizeLinear",
            "Gather",
            "DequantizeLinear",
            "Gemm" if gemm else "MatMul",
        ]
        assert built.opset_import[0].version == int4.QDQ_OPSET
    onnx.checker.check_model(built)
    ids = np.array([0, 5, 299, 17, 3])
    got = _run(built, ids, optimized=False)
    scheme = job.scheme
    table = next(q for key, q in job.quantized.items() if key[0] == "table")
    linear = next(q for key, q in job.quantized.items() if key[0] == "w")
    emb = scheme.dequantize_array(table.codes, table.scales, table.zeros, axis=1)[ids]
    w = scheme.dequantize_array(linear.codes, linear.scales, linear.zeros, axis=0)
    want = emb @ w
    if gemm:
        want = want + numpy_helper.to_array(model.graph.initializer[2])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    exact = _run(model, ids)
    for result in (got, _run(built, ids)):  # as written, and as ORT rewrites it
        rel = np.abs(result - exact).max() / np.abs(exact).max()
        assert 1e-3 < rel < 0.3  # int4 rounding: visible, bounded


def test_k_not_a_multiple_of_the_block_is_padded():
    model = _model(k=80, n=64)  # blocks of 32: 32, 32, 16
    job = _job()
    built, _ = job.materialize(model, job.plan(model, target_profile("ort-cpu"), ()))
    nbits = next(n for n in built.graph.node if n.op_type == "MatMulNBits")
    b = next(t for t in built.graph.initializer if t.name == nbits.input[1])
    assert list(b.dims) == [64, 3, 16]
    ids = np.arange(7)
    exact = _run(model, ids)
    assert np.abs(_run(built, ids) - exact).max() < 0.3 * np.abs(exact).max()


def test_gptq_has_lower_output_error_than_rtn():
    """GPTQ on correlated activations: the layer's output error on the calibration inputs is
    lower than round-to-nearest's at the same block size."""
    rng = np.random.default_rng(1)
    k, n = 128, 64
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((2048, k)) @ mix).astype(np.float32)  # correlated inputs
    w = rng.standard_normal((k, n)).astype(np.float32)
    scheme = int4.int4_scheme(32, symmetric=False)
    h = x.astype(np.float64).T @ x
    rtn = int4.quantize_rtn(w, 0, scheme)
    gptq = int4.quantize_gptq(w, h, scheme)

    def error(q):
        deq = scheme.dequantize_array(q.codes, q.scales, q.zeros, axis=0)
        return float(np.sum((x @ deq - x @ w) ** 2) / np.sum((x @ w) ** 2))

    assert gptq.codes.min() >= 0 and gptq.codes.max() <= 15
    assert error(gptq) < 0.8 * error(rtn)


def test_small_weights_and_short_axes_are_declined_with_reasons():
    model = _model(k=16, n=8, vocab=20)
    job = _job()
    with pytest.raises(UsageError, match="no MatMul, Gemm or Gather"):
        job.plan(model, target_profile("ort-cpu"), ())
    big = _model(k=128)
    with pytest.raises(UsageError, match="reduction axis of 128 is shorter than block 256"):
        _job(block_size=256).plan(big, target_profile("ort-cpu"), ())
    plan = _job().plan(big, target_profile("ort-cpu"), ("Gather",))
    assert plan.declined["embed"] == "excluded by 'Gather'" and "proj" in plan.applied


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"block_size": 48}, "--block-size 48"),
        ({"int4_method": "awq2"}, "--int4-method 'awq2'"),
        ({"accuracy_level": 7}, "--accuracy-level 7"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, settings, message):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    np.savez(tmp_path / "c.npz", ids=np.arange(16))
    with pytest.raises(UsageError, match=message):
        onnxshrink.optimize(path, quantize="int4", calibration_data=tmp_path / "c.npz", **settings)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_optimize_int4_end_to_end_within_the_budget(tmp_path, method):
    path = tmp_path / "m.onnx"
    onnx.save(_model(k=128, vocab=400), str(path))
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, 400, size=64))
    np.savez(tmp_path / "eval.npz", ids=rng.integers(0, 400, size=64))
    result = onnxshrink.optimize(
        path,
        tmp_path / "out.onnx",
        quantize="int4",
        int4_method=method,
        calibration_data=tmp_path / "calib.npz",
        inputs=tmp_path / "eval.npz",
        max_error=0.05,
    )
    q = result.quantization
    assert q is not None and q.budget.final_error <= 0.05
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert {"GatherBlockQuantized", "MatMulNBits"} & {n.op_type for n in saved.graph.node}
    assert (tmp_path / "out.onnx").stat().st_size < 0.5 * path.stat().st_size
    assert result.quantized_parity is not None and result.quantized_parity.held_out


def test_int8_int4_quantizes_linear_layers_in_int4_and_the_rest_in_int8(tmp_path):
    """int8+int4 on a model with a table, a linear layer and a Conv: the table and the linear
    layer go to int4, the Conv to int8 QDQ; the budget holds against the float model."""
    rng = np.random.default_rng(4)
    k = 128
    inits = [
        numpy_helper.from_array(rng.standard_normal((400, k)).astype(np.float32), "table"),
        numpy_helper.from_array((rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((16, 1, 5)) * 0.3).astype(np.float32), "cw"),
        numpy_helper.from_array(np.array([1, 1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w"], ["h"], name="proj"),
        helper.make_node("Reshape", ["h", "shape"], ["h3"], name="reshape"),
        helper.make_node("Conv", ["h3", "cw"], ["y"], name="conv", pads=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, k])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    ids = rng.integers(0, 400, size=64)  # 64 samples of one token
    np.savez(tmp_path / "calib.npz", ids=ids[:32])
    np.savez(tmp_path / "eval.npz", ids=ids[32:])
    result = onnxshrink.optimize(
        path,
        quantize="int8+int4",
        calibration_data=tmp_path / "calib.npz",
        inputs=tmp_path / "eval.npz",
        max_error=0.05,
        check_speed=False,
    )
    q = result.quantization
    assert q is not None and q.stage == "int8+int4" and q.budget.within_budget
    ops = [n.op_type for n in result.model.graph.node]
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    assert "QuantizeLinear" in ops and "Conv" in ops  # the Conv in int8 QDQ
    precision = {layer.name: layer.precision for layer in q.layers}
    assert precision["embed"] == precision["proj"] == "int4" and precision["conv"] == "int8"
    assert any("int8 on top of it" in note for note in q.notes)


def test_int8_int4_on_a_model_without_int4_layers_is_int8(tmp_path):
    """No MatMul/Gather weight: the int4 half is skipped with a note, int8 has the budget."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "cw"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "cw")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 4, 8, 8)).astype(np.float32))
    result = onnxshrink.optimize(
        path, quantize="int8+int4", calibration_data=tmp_path / "c.npz", check_speed=False
    )
    q = result.quantization
    assert q is not None and any(n.startswith("int4 skipped") for n in q.notes)
    assert "QuantizeLinear" in {n.op_type for n in result.model.graph.node}


@pytest.mark.parametrize(("method", "packed"), [("rtn", 1), ("gptq", 2)])
def test_a_weight_shared_by_two_layers(tmp_path, method, packed):
    """Two MatMuls reading one weight: rtn stores it once; gptq fits it to each layer's input
    and stores two, under different names. Both run and stay close to float."""
    rng = np.random.default_rng(6)
    k = 128
    w = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["a", "w"], ["ya"], name="left"),
            helper.make_node("MatMul", ["b", "w"], ["yb"], name="right"),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", k]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", k]) for n in ("ya", "yb")],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feeds = {n: rng.standard_normal((128, k)).astype(np.float32) for n in ("a", "b")}
    np.savez(tmp_path / "c.npz", **feeds)
    result = onnxshrink.optimize(
        path, quantize="int4", int4_method=method, calibration_data=tmp_path / "c.npz",
        max_error=0.05,
    )  # fmt: skip
    nbits = [t.name for t in result.model.graph.initializer if t.name.endswith("_nbits")]
    assert len(nbits) == packed and len(set(nbits)) == packed
    session = ort.InferenceSession(result.model.SerializeToString())
    x = {n: v[:4] for n, v in feeds.items()}
    for got, want in zip(session.run(None, x), (x["a"] @ w, x["b"] @ w), strict=True):
        assert np.abs(got - want).max() < 0.3 * np.abs(want).max()


def test_gptq_in_several_passes_gives_what_one_pass_gives(tmp_path, monkeypatch):
    """Hessians over the memory cap are collected in groups, one calibration pass each: the
    quantized weights are the same as with all Hessians at once."""
    model = _model(k=128, n=64)
    model.graph.node.append(helper.make_node("MatMul", ["y", "w2"], ["z"], name="proj2"))
    rng = np.random.default_rng(7)
    w2 = (rng.standard_normal((64, 128)) / 8).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w2, "w2"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    ids = [{"ids": rng.integers(0, 300, size=8)} for _ in range(4)]

    def fitted():
        job = int4._Int4Job(StageSettings(int4_method="gptq"), ids)
        job.plan(model, target_profile("ort-cpu"), ())
        return {key[0]: q.codes for key, q in job.quantized.items()}, job

    once, _ = fitted()
    monkeypatch.setattr(int4, "GPTQ_HESSIAN_BYTES", 1)  # one input per pass
    passes = []
    real = int4._Int4Job._collect_hessians

    def counting(self, model, units):
        passes.append(len(units))
        return real(self, model, units)

    monkeypatch.setattr(int4._Int4Job, "_collect_hessians", counting)
    twice, job = fitted()
    assert passes == [1, 1] and not job.hessians
    assert once.keys() == twice.keys() == {"w", "w2"}
    for name in once:
        np.testing.assert_array_equal(once[name], twice[name])


def test_a_weight_also_read_in_float_elsewhere_stays_float():
    """A tied embedding (the table gathered, and transposed for an output projection) is not
    quantized for the Gather: the float table stays anyway, so int4 would add bytes."""
    rng = np.random.default_rng(8)
    table = rng.standard_normal((300, 128)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
            helper.make_node("Transpose", ["table"], ["table_t"], name="tie"),
            helper.make_node("MatMul", ["emb", "table_t"], ["logits"], name="head"),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 300])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match="weight also read in float by 'tie'"):
        _job().plan(model, target_profile("ort-cpu"), ())
