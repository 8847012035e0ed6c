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


# Issue 9, 8: every tensor of a model is checked for external data outside its folder, not
# only initializers and TENSOR attributes (onnx before 1.21 read such references itself,
# through a symlink too, and never reads those of sparse tensors).


def _external_tensor(location: str, name: str = "ext") -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[4])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _sparse(values: onnx.TensorProto, indices: onnx.TensorProto) -> onnx.SparseTensorProto:
    sparse = onnx.SparseTensorProto(dims=[8])
    sparse.values.CopyFrom(values)
    sparse.indices.CopyFrom(indices)
    return sparse


def _plain(name: str, dtype: int = onnx.TensorProto.FLOAT) -> onnx.TensorProto:
    return onnx.helper.make_tensor(name, dtype, [4], [0, 1, 2, 3])


def _place_external(model: onnx.ModelProto, place: str, tensor: onnx.TensorProto) -> None:
    """Put `tensor` (an external-data reference) at `place` in `model`."""
    helper = onnx.helper
    graph = model.graph
    if place == "subgraph initializer":
        branch = helper.make_graph(
            [helper.make_node("Identity", ["ext"], ["o"])],
            "branch",
            [],
            [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [4])],
            [tensor],
        )
        cond = helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
        graph.initializer.append(cond)
        graph.node.append(
            helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch)
        )
    elif place == "TENSORS attribute":
        node = helper.make_node("Op", [], ["t_out"], domain="custom.test")
        attr = node.attribute.add()
        attr.name, attr.type = "values", onnx.AttributeProto.TENSORS
        attr.tensors.extend([_plain("first"), tensor])
        graph.node.append(node)
    elif place in ("function body", "function attribute default"):
        body = helper.make_node("Constant", [], ["c"], value=_plain("c"))
        if place == "function body":
            body = helper.make_node("Constant", [], ["c"], value=tensor)
        function = helper.make_function(
            "local.fn", "Fn", [], ["c"], [body], [helper.make_opsetid("", 13)]
        )
        if place == "function attribute default":
            function.attribute_proto.append(helper.make_attribute("w", tensor))
        model.functions.append(function)
    elif place == "sparse initializer values":
        indices = helper.make_tensor("ext_idx", onnx.TensorProto.INT64, [4], [0, 1, 2, 3])
        graph.sparse_initializer.append(_sparse(tensor, indices))
    elif place == "sparse initializer indices":
        tensor.data_type = onnx.TensorProto.INT64
        graph.sparse_initializer.append(_sparse(_plain("ext_values"), tensor))
    elif place == "SPARSE_TENSOR attribute":
        indices = helper.make_tensor("ext_idx", onnx.TensorProto.INT64, [4], [0, 1, 2, 3])
        graph.node.append(
            helper.make_node("Constant", [], ["sp"], sparse_value=_sparse(tensor, indices))
        )
    elif place == "training graph":
        info = model.training_info.add()
        info.initialization.name = "init"
        info.initialization.initializer.append(tensor)
    else:
        raise AssertionError(place)


_PLACES = [
    "subgraph initializer",
    "TENSORS attribute",
    "function body",
    "function attribute default",
    "sparse initializer values",
    "sparse initializer indices",
    "SPARSE_TENSOR attribute",
    "training graph",
]


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
@pytest.mark.parametrize("place", _PLACES)
def test_external_data_outside_folder_is_refused_everywhere(
    tmp_path, conv_bn_model, monkeypatch, place, how
):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[how]
    if how == "symlink":
        (folder / "link.bin").symlink_to(secret)
    _place_external(conv_bn_model, place, _external_tensor(location))
    path = folder / "ext.onnx"
    onnx.save_model(conv_bn_model, str(path))
    read = []
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a: read.append(a))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path)
    assert read == []  # refused before any external data was read


def test_external_data_onnx_does_not_read_is_refused(tmp_path, conv_bn_model):
    """A sparse tensor's external data inside the folder: onnx leaves it unread, so the model
    would reach the rules and ONNX Runtime with a dangling reference; exit 2 instead."""
    (tmp_path / "values.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    _place_external(conv_bn_model, "sparse initializer values", _external_tensor("values.bin"))
    path = tmp_path / "sparse.onnx"
    onnx.save_model(conv_bn_model, str(path))
    with pytest.raises(ModelLoadError, match="external data where onnx does not read it"):
        load_model(path)


def test_malformed_external_data_is_refused(tmp_path, conv_bn_model):
    tensor = _external_tensor("weights.bin")
    entry = tensor.external_data.add()
    entry.key, entry.value = "offset", "-5"
    conv_bn_model.graph.initializer.append(tensor)
    path = tmp_path / "bad_offset.onnx"
    onnx.save_model(conv_bn_model, str(path))
    with pytest.raises(ModelLoadError, match="malformed"):
        load_model(path)


# Issue 9, 9: tensor data that does not match its dims, or an unknown data type, is bad input
# (exit 2, one line naming the tensor), not an internal error deep in a rule.


def _float_tensor(name: str = "w") -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), name)


def _raw_short(t: onnx.TensorProto) -> None:
    t.raw_data = t.raw_data[:8]


def _raw_long(t: onnx.TensorProto) -> None:
    t.raw_data = t.raw_data + b"\0\0\0\0"


def _float_data_short(t: onnx.TensorProto) -> None:
    t.ClearField("raw_data")
    t.float_data.extend([1.0] * 5)


def _dtype_99(t: onnx.TensorProto) -> None:
    t.data_type = 99


def _no_data(t: onnx.TensorProto) -> None:
    t.ClearField("raw_data")


def _wrong_field(t: onnx.TensorProto) -> None:
    t.ClearField("raw_data")
    t.int64_data.extend([1] * 6)


def _negative_dim(t: onnx.TensorProto) -> None:
    t.dims[0] = -2


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_raw_short, "holds 8 bytes of raw_data where its type FLOAT and dims [2, 3] need 24"),
        (_raw_long, "holds 28 bytes of raw_data"),
        (_float_data_short, "holds 5 values of float_data"),
        (_dtype_99, "unknown data type 99"),
        (_no_data, "holds no data for its 6 element(s)"),
        (_wrong_field, "holds its data in int64_data"),
        (_negative_dim, "negative dim"),
    ],
)
@pytest.mark.parametrize("place", ["initializer", "Constant in a subgraph"])
def test_tensor_data_that_does_not_match_its_dims_is_refused(
    tmp_path, conv_bn_model, corrupt, message, place
):
    tensor = _float_tensor()
    corrupt(tensor)
    if place == "initializer":
        conv_bn_model.graph.initializer.append(tensor)
    else:
        helper = onnx.helper
        branch = helper.make_graph(
            [helper.make_node("Constant", [], ["o"], value=tensor)],
            "branch",
            [],
            [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [2, 3])],
        )
        conv_bn_model.graph.initializer.append(
            helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
        )
        conv_bn_model.graph.node.append(
            helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch)
        )
    path = tmp_path / "bad_tensor.onnx"
    onnx.save_model(conv_bn_model, str(path))
    with pytest.raises(ModelLoadError, match="tensor 'w'") as caught:
        load_model(path)
    assert message in str(caught.value)


def test_packed_and_string_tensors_of_the_right_size_load(tmp_path, conv_bn_model):
    helper = onnx.helper
    conv_bn_model.graph.initializer.extend(
        [
            helper.make_tensor("i4", onnx.TensorProto.INT4, [3], np.array([1, 2, 3]), raw=True),
            helper.make_tensor("s", onnx.TensorProto.STRING, [2], [b"a", b"b"]),
            helper.make_tensor("cx", onnx.TensorProto.COMPLEX64, [2], [1 + 2j, 3 + 4j]),
            helper.make_tensor("e", onnx.TensorProto.FLOAT, [0, 3], []),
        ]
    )
    path = tmp_path / "types.onnx"
    onnx.save_model(conv_bn_model, str(path))
    assert len(load_model(path).graph.initializer) == len(conv_bn_model.graph.initializer)


def test_name_that_is_not_utf8_is_refused(tmp_path, conv_bn_model):
    """Found by bench/fuzz.py: a flipped bit in a name gives a string protobuf hands over as
    bytes; onnx.checker lets it through and the rewrite failed on it (internal error)."""
    conv_bn_model.graph.node[0].output[0] = "w_name"
    data = conv_bn_model.SerializeToString().replace(b"w_name", b"w\xf4name")
    path = tmp_path / "latin.onnx"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=r"is not valid UTF-8"):
        load_model(path)


@pytest.mark.parametrize(
    "where, elem, message",
    [
        ("input", 99, "'x' has unknown element type 99"),
        ("output", 40, "'y' has unknown element type 40"),
        ("input", 0, "'x' has no element type"),
    ],
)
def test_unknown_element_type_of_an_input_or_output_is_refused(
    tmp_path, conv_bn_model, where, elem, message
):
    """Found by bench/fuzz.py: an input of element type 99 was a KeyError (internal error)."""
    value = (conv_bn_model.graph.input if where == "input" else conv_bn_model.graph.output)[0]
    value.type.tensor_type.elem_type = elem
    path = tmp_path / "elem.onnx"
    onnx.save_model(conv_bn_model, str(path))
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_bad_unnamed_tensor_is_named_by_its_node(tmp_path, conv_bn_model):
    tensor = onnx.numpy_helper.from_array(np.ones(3, np.float32))
    tensor.raw_data = tensor.raw_data[:-1]
    conv_bn_model.graph.node.append(
        onnx.helper.make_node("Constant", [], ["k"], name="consts", value=tensor)
    )
    path = tmp_path / "unnamed.onnx"
    onnx.save_model(conv_bn_model, str(path))
    with pytest.raises(
        ModelLoadError,
        match=r"the tensor of attribute 'value' of node 'consts' \(Constant\) holds 11 bytes",
    ):
        load_model(path)


def test_external_data_shorter_than_its_dims_is_refused_unread(
    tmp_path, conv_bn_model, monkeypatch
):
    """The size check of issue 9, 9 covers external data too, from the file's size (no read)."""
    (tmp_path / "weights.bin").write_bytes(np.ones(10, np.float32).tobytes())
    path = _with_external_data(tmp_path, conv_bn_model, "weights.bin")  # dims 64x64
    read = []
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a: read.append(a))
    with pytest.raises(
        ModelLoadError, match=r"tensor 'big' holds 40 bytes of raw_data .* need 16384"
    ):
        load_model(path)
    assert read == []
