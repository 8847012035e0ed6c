"""Loading refuses bad files with one clear message; saving is atomic."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from onnxshrink.engine.io import load_model, save_model
from onnxshrink.errors import ModelLoadError, UsageError


def test_load_roundtrip(conv_bn_path, conv_bn_model):
    model = load_model(conv_bn_path)
    assert model.graph == conv_bn_model.graph


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty"),
        (b"not an onnx model at all \x00\x01", "not"),
    ],
)
def test_load_rejects_garbage(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_load_rejects_truncated(conv_bn_path):
    data = conv_bn_path.read_bytes()
    conv_bn_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(conv_bn_path)


def test_load_rejects_missing_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_load_rejects_invalid_model(tmp_path, conv_bn_model):
    conv_bn_model.graph.node[1].input[0] = "does_not_exist"
    path = tmp_path / "invalid.onnx"
    onnx.save_model(conv_bn_model, str(path))
    with pytest.raises(ModelLoadError, match="invalid ONNX model"):
        load_model(path)


def test_load_rejects_undeclared_domain(tmp_path, conv_bn_model):
    conv_bn_model.graph.node[1].domain = "com.example.unknown"
    path = tmp_path / "domain.onnx"
    onnx.save_model(conv_bn_model, str(path))
    with pytest.raises(ModelLoadError, match="invalid ONNX model"):
        load_model(path)


def _with_external_data(tmp_path, model, location):
    tensor = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "big")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    model.graph.initializer.append(tensor)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path))
    return path


def test_external_data_outside_folder_is_refused(tmp_path, conv_bn_model):
    (tmp_path / "secret.bin").write_bytes(np.ones((64, 64), np.float32).tobytes())
    sub = tmp_path / "model"
    sub.mkdir()
    path = _with_external_data(sub, conv_bn_model, "../secret.bin")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path)


def test_external_data_missing_file_is_refused(tmp_path, conv_bn_model):
    path = _with_external_data(tmp_path, conv_bn_model, "weights.bin")
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(path)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, conv_bn_model):
    dest = tmp_path / "out.onnx"
    save_model(conv_bn_model, dest)
    assert onnx.load(str(dest)).graph == conv_bn_model.graph
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_save_to_missing_folder_or_directory_fails_cleanly(tmp_path, conv_bn_model):
    with pytest.raises(UsageError, match="does not exist"):
        save_model(conv_bn_model, tmp_path / "nope" / "out.onnx")
    with pytest.raises(UsageError, match="is a directory"):
        save_model(conv_bn_model, tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_large_model_uses_external_data(tmp_path, conv_bn_model, monkeypatch):
    import onnxshrink.engine.io as io_module

    monkeypatch.setattr(io_module, "_EXTERNAL_DATA_THRESHOLD", 100)
    conv_bn_model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32), "unused_big")
    )
    dest = tmp_path / "big.onnx"
    save_model(conv_bn_model, dest)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    loaded = load_model(dest)
    big = next(t for t in loaded.graph.initializer if t.name == "unused_big")
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(big), np.arange(4096, dtype=np.float32)
    )


def test_output_path_that_is_not_a_regular_file_is_refused(tmp_path, conv_bn_model):
    """Issue 9, 1: a FIFO (or device node) at -o must not be replaced by a regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        save_model(conv_bn_model, fifo)
    assert fifo.is_fifo()
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "nowhere" / "x.onnx")
    with pytest.raises(UsageError, match="broken symlink"):
        save_model(conv_bn_model, dangling)
    target = tmp_path / "real.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    save_model(conv_bn_model, link)  # a symlink to a regular file is fine
    assert onnx.load(str(link)).graph.node
