"""Issue 9, 4 and 5: large models are held once, written with external data safely.

A model over 2 GB cannot be built in a unit test; `bench/big_model.py` runs one through the
whole command. Here the size thresholds are lowered so that small models take the same paths:
external data on save, sessions from files, the skeleton that stands in for the model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink.engine.io as io_module
import onnxshrink.engine.optimize as optimize_module
from onnxshrink.engine.io import load_model, save_model, skeleton, structure_only
from onnxshrink.engine.optimize import optimize

REPO = Path(__file__).resolve().parents[1]


def _mlp(seed: int = 0, width: int = 64, layers: int = 3) -> onnx.ModelProto:
    """MatMul + bias Add + Relu layers with distinct weights (16 KB each)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(width) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = f"h{i}" if i + 1 < layers else "y"
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [out]),
        ]
        x = out
    graph = helper.make_graph(
        nodes,
        f"mlp{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture
def small_thresholds(monkeypatch):
    """Every model counts as large: external data on save, sessions from files."""
    monkeypatch.setattr(io_module, "_EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(io_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(optimize_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(optimize_module, "EXPORT_DIRECT_BYTES", 100)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_save_with_external_data_leaves_the_model_unchanged(tmp_path, small_thresholds):
    model = _mlp()
    before = model.SerializeToString()
    dest = save_model(model, tmp_path / "out.onnx")
    assert model.SerializeToString() == before  # tensors moved out while writing came back
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    on_disk = onnx.load(str(dest), load_external_data=False)
    external = [t for t in on_disk.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert {t.name for t in external} == {"w0", "w1", "w2"}  # 16 KB weights; biases inline
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert all(o % 4096 == 0 for o in offsets)  # aligned: ORT can map them
    loaded = load_model(dest)
    for name, value in _weights(model).items():
        np.testing.assert_array_equal(_weights(loaded)[name], value)


def test_data_file_never_replaces_the_inputs_own(tmp_path, small_thresholds):
    """Issue 9, 5: an input whose data file is `<out>.data` must survive `-o <out>`."""
    source = tmp_path / "in.onnx"
    onnx.save_model(_mlp(), str(source), save_as_external_data=True, location="out.onnx.data")
    data_before = (tmp_path / "out.onnx.data").read_bytes()
    result = optimize(source, tmp_path / "out.onnx")
    assert result.parity is not None and result.parity.passed
    assert (tmp_path / "out.onnx.data").read_bytes() == data_before
    assert (tmp_path / "out.onnx.1.data").is_file()
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_concurrent_writers_leave_a_matching_pair(tmp_path, small_thresholds):
    """Issue 9, 5: two writers to one path never leave one's model beside the other's data."""
    dest = tmp_path / "out.onnx"
    models = [_mlp(seed) for seed in (1, 2)]
    errors: list[BaseException] = []

    def writer(model: onnx.ModelProto) -> None:
        try:
            for _ in range(15):
                save_model(model, dest)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    loaded = load_model(dest)
    expected = next(m for m in models if m.graph.name == loaded.graph.name)
    for name, value in _weights(expected).items():
        np.testing.assert_array_equal(_weights(loaded)[name], value)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]


@pytest.mark.parametrize("external", [False, True])
def test_kill_while_writing_leaves_nothing(tmp_path, external):
    """Issue 9, 9: a `kill -9` in the middle of a write leaves no temporary file behind."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import onnxshrink.engine.io as io
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_large_models import _mlp
        if {external}:
            io._EXTERNAL_DATA_THRESHOLD = 100
        real = io._write_all
        def stall(fd, data):
            real(fd, data[: len(data) // 2])
            print("writing", flush=True)
            time.sleep(60)
        io._write_all = stall
        io.save_model(_mlp(), {str(tmp_path / "out.onnx")!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        assert os.listdir(tmp_path) == []  # half-written, and nothing has a name yet
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.listdir(tmp_path) == []


def test_skeleton_and_structure_hold_no_weights():
    model = _mlp(width=200)
    light = skeleton(model)
    stubs = {t.name: t for t in light.graph.initializer}
    assert not stubs["w0"].raw_data and list(stubs["w0"].dims) == [200, 200]
    assert stubs["b0"].raw_data  # 800 bytes: kept
    structure = structure_only(model)
    onnx.checker.check_model(structure)  # a valid model without the weights
    assert {"w0", "w1", "w2"} <= {v.name for v in structure.graph.input}
    assert structure.ByteSize() < model.ByteSize() / 50


def test_large_model_path_of_optimize_matches_the_normal_one(tmp_path, monkeypatch):
    """The large-model path (original read by ORT from its file, the pre-rewrite weights
    dropped, the candidate's session from a file) gives the same model as the normal one."""
    source = tmp_path / "in.onnx"
    onnx.save_model(_mlp(), str(source), save_as_external_data=True, location="in.data")
    normal = optimize(source, tmp_path / "normal.onnx")
    monkeypatch.setattr(io_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(optimize_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(optimize_module, "EXPORT_DIRECT_BYTES", 100)
    large = optimize(source, tmp_path / "large.onnx")
    assert large.parity is not None and large.parity.passed
    assert [n.op_type for n in large.model.graph.node] == [
        n.op_type for n in normal.model.graph.node
    ]
    a, b = _weights(normal.model), _weights(large.model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert large.before.parameters == normal.before.parameters


def test_large_model_retry_loads_the_weights_again(tmp_path, monkeypatch):
    """A parity retry after the weights were dropped reads the model from its file again."""
    source = tmp_path / "in.onnx"
    onnx.save_model(_mlp(), str(source))
    monkeypatch.setattr(optimize_module, "SESSION_FILE_BYTES", 100)
    loads = []
    real_load = optimize_module.load_model

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(optimize_module, "load_model", counting_load)
    # rtol 0 with weight rescaling forced to fail once: the first tier's parity fails
    calls = []
    real_check = optimize_module.check_parity

    def failing_once(*args, **kwargs):
        report = real_check(*args, **kwargs)
        calls.append(report)
        if len(calls) == 1:
            report.passed = False
            for output in report.outputs:
                output.ok = False
        return report

    monkeypatch.setattr(optimize_module, "check_parity", failing_once)
    monkeypatch.setattr(
        optimize_module, "rewrite_model", _always_scaling(optimize_module.rewrite_model)
    )
    result = optimize(source, tmp_path / "out.onnx")
    assert len(calls) == 2 and result.parity is not None and result.parity.passed
    assert len(loads) == 2  # the first load, then the retry's


def _always_scaling(rewrite):
    """rewrite_model, reporting a weight-rescaling rule as applied (so a failure retries)."""

    def wrapped(*args, **kwargs):
        model, stats = rewrite(*args, **kwargs)
        stats.applied["fold-batchnorm"] = stats.applied.get("fold-batchnorm", 0) + 1
        return model, stats

    return wrapped


def test_large_model_int8_path_matches_the_normal_one(tmp_path, monkeypatch):
    """--quantize int8 on the large-model path (prepared in place, candidates built from a
    skeleton with only the kept float weights copied in) writes the same model."""
    source = tmp_path / "in.onnx"
    onnx.save_model(_mlp(width=96), str(source))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((16, 96)).astype(np.float32))
    settings = {"quantize": "int8", "calibration_data": calib, "check_speed": False}
    normal = optimize(source, tmp_path / "normal.onnx", **settings)
    monkeypatch.setattr(io_module, "SESSION_FILE_BYTES", 100)
    import onnxshrink.rules.qdq as qdq_module

    monkeypatch.setattr(qdq_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(optimize_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(io_module, "_OFFLOAD_TENSOR_BYTES", 100)
    skeletons = []
    real_skeleton = qdq_module.skeleton
    monkeypatch.setattr(
        qdq_module, "skeleton", lambda m, *rest: skeletons.append(1) or real_skeleton(m, *rest)
    )
    stores: list[Path] = []
    real_offload = optimize_module.offload

    def spying_offload(model, folder):
        stores.append(folder)
        light = real_offload(model, folder)
        assert not any(t.HasField("raw_data") for t in light.graph.initializer if t.name[0] == "w")
        return light

    monkeypatch.setattr(optimize_module, "offload", spying_offload)
    large = optimize(source, tmp_path / "large.onnx", **settings)
    assert skeletons  # the candidates were built from skeletons
    assert len(stores) == 1 and not stores[0].exists()  # offloaded, and the scratch removed
    assert not io_module._STORES
    # the returned model holds its bytes again (it outlives the scratch folder)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in large.model.graph.initializer)
    assert large.quantization is not None and large.quantization.model is large.model
    assert sorted(n.op_type for n in large.model.graph.node) == sorted(
        n.op_type for n in normal.model.graph.node
    )
    assert "DequantizeLinear" in {n.op_type for n in large.model.graph.node}
    a, b = _weights(normal.model), _weights(large.model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("spec", ["unstructured:0.5", "channels:0.25"])
def test_large_model_pruning_path_matches_the_normal_one(tmp_path, monkeypatch, spec):
    """--sparsify on the large-model path (weights offloaded to a scratch file, read back
    through array_of) writes the same model as the normal path."""
    source = tmp_path / "in.onnx"
    onnx.save_model(_mlp(width=96), str(source))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((16, 96)).astype(np.float32))
    settings = {"sparsify": spec, "calibration_data": calib, "max_error": 10.0}
    normal = optimize(source, tmp_path / "normal.onnx", **settings)
    monkeypatch.setattr(io_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(optimize_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(io_module, "_OFFLOAD_TENSOR_BYTES", 100)
    large = optimize(source, tmp_path / "large.onnx", **settings)
    assert not io_module._STORES
    assert not any(t.data_location == TensorProto.EXTERNAL for t in large.model.graph.initializer)
    assert large.quantization is not None and large.quantization.quantized
    a, b = _weights(normal.model), _weights(large.model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_large_model_speed_check_times_the_float_model_apart(tmp_path, monkeypatch):
    """On a large model the int8 stage times the float model on its own before the budget
    search, then the two candidates against each other: never all three sessions."""
    import onnxshrink.rules.int8 as int8_module

    source = tmp_path / "in.onnx"
    onnx.save_model(_mlp(width=96), str(source))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((16, 96)).astype(np.float32))
    monkeypatch.setattr(int8_module, "SESSION_FILE_BYTES", 100)
    timed: list[int] = []
    real = int8_module.interleaved_ms

    def counting(models, feed, runs, progress=None):
        timed.append(len(models))
        return real(models, feed, runs, progress)

    monkeypatch.setattr(int8_module, "interleaved_ms", counting)
    result = optimize(source, tmp_path / "out.onnx", quantize="int8", calibration_data=calib)
    assert timed[0] == 1 and len(timed) == 2 and timed[1] <= 2
    assert result.quantization is not None and result.quantization.speed is not None
    speed = result.quantization.speed
    assert speed.float_ms > 0 and speed.int8_ms > 0 and speed.float_apart
    assert "float model timed apart" in speed.how


def test_offloaded_weights_are_read_written_and_loaded_back(
    tmp_path, small_thresholds, monkeypatch
):
    """`offload` moves the large initializers to a scratch data file: `array_of` reads them,
    sessions and `save_model` take the model as it is, `materialize` loads it back."""
    import onnxruntime as ort

    from onnxshrink.engine.io import (
        array_of,
        discard_store,
        inference_session,
        materialize,
        offload,
    )

    monkeypatch.setattr(io_module, "_OFFLOAD_TENSOR_BYTES", 1000)  # the weights, not biases
    model = _mlp()
    store = tmp_path / "store"
    store.mkdir()
    light = offload(model, store)
    moved = [t for t in light.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert {t.name for t in moved} == {"w0", "w1", "w2"} and len(os.listdir(store)) == 1
    assert io_module.model_bytes(light) >= 3 * 64 * 64 * 4  # sized as if in memory
    expected = _weights(model)
    for tensor in light.graph.initializer:
        np.testing.assert_array_equal(array_of(tensor), expected[tensor.name])
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    session = inference_session(light, ort.SessionOptions(), ["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], want)
    assert len(os.listdir(store)) == 1  # the session's model file went again
    dest = save_model(light, tmp_path / "out.onnx")  # copied from the store
    saved = load_model(dest)
    assert _weights(saved).keys() == expected.keys()
    for name, array in _weights(saved).items():
        np.testing.assert_array_equal(array, expected[name])
    back = materialize(light)
    assert back.SerializeToString() == model.SerializeToString()
    discard_store(store)
    assert not io_module._STORES


def test_opset_conversion_of_a_large_model_parks_its_weights(tmp_path, monkeypatch):
    """`--opset` on a large model: the version converter sees the graph without its weights
    (it serializes what it gets: past 2 GB that fails), and they come back by name."""
    import onnxshrink.engine.shapes as shapes_module

    source = tmp_path / "in.onnx"
    old = _mlp(width=96)
    old.opset_import[0].version = 11
    onnx.save_model(old, str(source))
    normal = optimize(source, tmp_path / "normal.onnx", opset=17)
    for module in (io_module, optimize_module, shapes_module):
        monkeypatch.setattr(module, "SESSION_FILE_BYTES", 100)
    seen: list[int] = []
    import onnx.version_converter as converter

    real_convert = converter.convert_version

    def spying(model, target):
        seen.append(sum(len(t.raw_data) for t in model.graph.initializer))
        return real_convert(model, target)

    monkeypatch.setattr(converter, "convert_version", spying)
    large = optimize(source, tmp_path / "large.onnx", opset=17)
    assert seen and max(seen) < 96 * 96 * 4  # no weight went through the converter
    assert large.parity is not None and large.parity.passed
    assert large.model.opset_import[0].version == 17
    a, b = _weights(normal.model), _weights(large.model)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_large_model_in_one_file_is_written_a_tensor_at_a_time(tmp_path, monkeypatch):
    """Under the external-data threshold but over SESSION_FILE_BYTES, a model is streamed to
    its file (no serialized copy in memory), offloaded tensors read from their scratch file;
    it parses back equal to the model."""
    from onnxshrink.engine.io import discard_store, offload

    monkeypatch.setattr(io_module, "SESSION_FILE_BYTES", 100)
    monkeypatch.setattr(io_module, "_OFFLOAD_TENSOR_BYTES", 1000)
    model = _mlp()
    model.metadata_props.add(key="k", value="v")
    dest = save_model(model, tmp_path / "plain.onnx")
    assert not (tmp_path / "plain.onnx.data").exists()
    assert onnx.load(str(dest)) == model
    store = tmp_path / "store"
    store.mkdir()
    light = offload(model, store)
    dest = save_model(light, tmp_path / "offloaded.onnx")
    discard_store(store)
    assert onnx.load(str(dest)) == model


def test_a_temp_folder_that_cannot_hold_the_weights_keeps_them_in_memory(tmp_path, monkeypatch):
    """Offloading fails (a full temp folder, say): the stage runs on the weights in memory
    and the scratch folder is removed."""
    source = tmp_path / "in.onnx"
    onnx.save_model(_mlp(width=96), str(source))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((16, 96)).astype(np.float32))
    monkeypatch.setattr(optimize_module, "SESSION_FILE_BYTES", 100)
    folders: list[Path] = []

    def failing(model, folder):
        folders.append(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(optimize_module, "offload", failing)
    result = optimize(
        source, tmp_path / "out.onnx", quantize="int8", calibration_data=calib, check_speed=False
    )
    assert result.quantization is not None and result.output_path is not None
    assert folders and not folders[0].exists()
