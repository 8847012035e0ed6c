"""Load and save ONNX models safely.

Loading refuses anything that is not a readable, valid ONNX model, and refuses external-data
locations that point outside the model's own folder. Saving is atomic: the model is written to
a temporary file beside the destination and renamed into place, so a failed write never leaves a
partial file; models over 2 GB are written with external data automatically.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from onnxshrink.errors import ModelLoadError, UsageError, first_line

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that lies outside `base_dir` (after symlinks) or is missing.

    Every tensor counts (`_all_tensors`), not only those onnx itself loads: onnx before 1.21
    followed a symlink out of the folder, and a reference it leaves unread (a sparse tensor)
    would be read by whatever loads the model next.
    """
    base = base_dir.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        try:
            location = ExternalDataInfo(tensor).location
            target = (base / location).resolve()
        except (ValueError, OSError, RuntimeError) as exc:  # bad offset, NUL byte, loop
            raise ModelLoadError(
                f"external data of tensor {tensor.name!r} is malformed ({first_line(exc)})"
            ) from None
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelLoadError(
                f"external data location {location!r} of tensor {tensor.name!r} points outside "
                f"the model's folder {base}; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"external data file {location!r} of tensor {tensor.name!r} is missing"
            )


def node_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The subgraphs a node holds in its attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph nested in it (If branches, Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from graph_protos(sub)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model holds, wherever it is.

    Initializers and sparse initializers (values and indices) of the main graph, of every
    subgraph and of the training-info graphs; tensors in node attributes (TENSOR, TENSORS,
    SPARSE_TENSOR, SPARSE_TENSORS), in those graphs and in function bodies; and functions'
    attribute defaults. Attribute fields are read by presence, not by the declared attribute
    type, as onnx's own external-data loader reads them.
    """
    return (tensor for tensor, _ in _located_tensors(model))


def _located_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """`_all_tensors`, each with where it is, for messages ("attribute 'value' of node 'c'")."""
    graphs = [model.graph]
    for info in model.training_info:
        graphs += [info.initialization, info.algorithm]
    for graph in graphs:
        yield from _graph_tensors(graph)
    for function in model.functions:
        where = f"function {function.name!r}"
        yield from _attribute_tensors(function.attribute_proto, f"a default of {where}")
        for node in function.node:
            yield from _attribute_tensors(node.attribute, f"{_node_label(node)} in {where}")


def _node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name or (node.output[0] if node.output else '')!r} ({node.op_type})"


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    for tensor in graph.initializer:
        yield tensor, f"initializer {tensor.name!r}"
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"sparse initializer {sparse.values.name!r}"
        yield sparse.indices, f"the indices of sparse initializer {sparse.values.name!r}"
    for node in graph.node:
        yield from _attribute_tensors(node.attribute, _node_label(node))


def _attribute_tensors(
    attributes: Iterable[onnx.AttributeProto], owner: str
) -> Iterator[tuple[onnx.TensorProto, str]]:
    for attr in attributes:
        where = f"attribute {attr.name!r} of {owner}"
        if attr.HasField("t"):
            yield attr.t, where
        for tensor in attr.tensors:
            yield tensor, where
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for s in [*sparse, *attr.sparse_tensors]:
            yield s.values, where
            yield s.indices, f"the indices in {where}"
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


# Sub-byte element types: bits per element as packed in raw_data (the others: numpy itemsize).
_PACKED_BITS = {
    name: bits
    for bits, names in (
        (2, ("UINT2", "INT2")),
        (4, ("UINT4", "INT4", "FLOAT4E2M1")),
        (6, ("FLOAT6E2M3", "FLOAT6E3M2")),
    )
    for name in names
}
# The typed field that holds each type's values when raw_data is not used, and how many values
# one element takes there; types missing here (sub-byte, float8) are only checked in raw_data.
_VALUE_FIELDS = {
    "FLOAT": ("float_data", 1),
    "COMPLEX64": ("float_data", 2),
    "DOUBLE": ("double_data", 1),
    "COMPLEX128": ("double_data", 2),
    "INT64": ("int64_data", 1),
    "UINT32": ("uint64_data", 1),
    "UINT64": ("uint64_data", 1),
    "STRING": ("string_data", 1),
    **{
        name: ("int32_data", 1)
        for name in ("INT32", "INT16", "INT8", "UINT16", "UINT8", "BOOL", "FLOAT16", "BFLOAT16")
    },
}
_DATA_FIELDS = (
    "raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
    "uint64_data",
)  # fmt: skip


def _check_tensor_data(model: onnx.ModelProto) -> None:
    """Refuse a tensor whose data does not match its declared type and dims, with one line.

    Every tensor of `_all_tensors`, after external data is read: its data type must be one
    onnx knows, its dims non-negative, and its data exactly as long as type and dims say
    (raw_data in bytes, packed for sub-byte types; a typed field in values). onnx.checker
    lets through raw_data longer than the dims need and unknown types, which later fail deep
    inside a rule or ONNX Runtime. raw_data's length is read without keeping a copy.
    """
    known = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    for tensor, where in _located_tensors(model):
        if tensor.ByteSize() == 0:  # an unset sub-message (a sparse tensor's missing part)
            continue
        if where.startswith("initializer"):
            label = f"tensor {tensor.name!r}"
        else:
            label = f"tensor {tensor.name!r} ({where})" if tensor.name else f"the tensor of {where}"
        if uses_external_data(tensor):
            raise ModelLoadError(
                f"{label} keeps external data where onnx does not read it (a sparse "
                "tensor, a function's attribute default or a training graph); not supported"
            )
        if tensor.data_type not in known:
            raise ModelLoadError(f"{label} has unknown data type {tensor.data_type}")
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{label} has a negative dim: {list(tensor.dims)}")
        if tensor.HasField("segment"):
            continue  # one segment of a tensor split across protos: no whole size to check
        type_name = onnx.TensorProto.DataType.Name(tensor.data_type)
        count = math.prod(tensor.dims)
        fields = [f for f in _DATA_FIELDS if f != "raw_data" and len(getattr(tensor, f))]
        if tensor.HasField("raw_data"):
            fields.append("raw_data")
        if len(fields) > 1:
            raise ModelLoadError(f"{label} holds data in more than one field ({', '.join(fields)})")
        if not fields:
            if count:
                raise ModelLoadError(
                    f"{label} holds no data for its {count} element(s) of dims {list(tensor.dims)}"
                )
            continue
        field = fields[0]
        if field == "raw_data":
            if type_name == "STRING":
                raise ModelLoadError(f"{label}: a string tensor cannot use raw_data")
            bits = _PACKED_BITS.get(type_name)
            if bits is None:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                bits = 8 * itemsize
            need = -(-count * bits // 8)
            have = len(tensor.raw_data)
            unit = "bytes"
        else:
            expected = _VALUE_FIELDS.get(type_name)
            if expected is None:
                continue  # sub-byte and float8 types: packing in int32_data varies by version
            if expected[0] != field:
                raise ModelLoadError(
                    f"{label} of type {type_name} holds its data in {field}; "
                    f"{type_name} data goes in raw_data or {expected[0]}"
                )
            need = count * expected[1]
            have = len(getattr(tensor, field))
            unit = "values"
        if have != need:
            raise ModelLoadError(
                f"{label} holds {have} {unit} of {field} where its type {type_name} "
                f"and dims {list(tensor.dims)} need {need}"
            )


def _check_strings(message: Any) -> None:
    """Refuse a string field (a name, an op type, an attribute string) that is not UTF-8.

    protobuf hands such a field to Python as bytes, not str, and onnx.checker lets it through;
    every tool after it then fails on a name it cannot read. Bytes fields (tensor data) are
    not read, so nothing large is copied.
    """
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING:
            value = getattr(message, field.name)
            for text in value if _is_repeated(field) else [value]:
                if not isinstance(text, str):
                    raise ModelLoadError(
                        f"{message.DESCRIPTOR.name}.{field.name} {text!r} is not valid UTF-8 "
                        "(a corrupted file?)"
                    )
        elif field.type == field.TYPE_MESSAGE:
            if _is_repeated(field):
                for item in getattr(message, field.name):
                    _check_strings(item)
            elif message.HasField(field.name):
                _check_strings(getattr(message, field.name))


def _is_repeated(field: Any) -> bool:
    # protobuf 7 has `is_repeated` and no `label`; older versions only `label`.
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        return bool(field.label == field.LABEL_REPEATED)
    return bool(repeated)


def _check_value_types(model: onnx.ModelProto) -> None:
    """Refuse a declared type that onnx does not know (element type 99), anywhere; and a
    graph input or output of the main graph whose tensor type has no element type."""
    known = set(onnx.TensorProto.DataType.values())

    def check(kind: onnx.TypeProto, name: str) -> None:
        which = kind.WhichOneof("value")
        if which in ("tensor_type", "sparse_tensor_type"):
            elem = getattr(kind, which).elem_type
            if elem not in known:
                raise ModelLoadError(f"{name!r} has unknown element type {elem}")
        elif which in ("sequence_type", "optional_type"):
            check(getattr(kind, which).elem_type, name)
        elif which == "map_type":
            if kind.map_type.key_type not in known:
                raise ModelLoadError(f"{name!r} has unknown map key type {kind.map_type.key_type}")
            check(kind.map_type.value_type, name)

    for graph in graph_protos(model.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            check(value.type, value.name)
    for value in (*model.graph.input, *model.graph.output):
        if value.type.WhichOneof("value") == "tensor_type" and not value.type.tensor_type.elem_type:
            raise ModelLoadError(f"graph input or output {value.name!r} has no element type")


def load_model(path: str | os.PathLike[str], check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data; raise ModelLoadError with one clear line.

    The file is only read, never modified.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, not an ONNX file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: file is empty")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise ModelLoadError(f"{p}: not a readable ONNX model ({first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{p}: not an ONNX model (no graph found; truncated or wrong file?)")
    try:
        _check_strings(model)
        _check_external_data(model, p.parent)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{p}: {exc}") from None
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot read external data ({first_line(exc)})") from None
    try:
        _check_tensor_data(model)
        _check_value_types(model)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{p}: {exc}") from None
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise ModelLoadError(f"{p}: invalid ONNX model: {first_line(exc)}") from None
    return model


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Fail early, with one line, when `path` cannot receive an output file.

    Something that exists at `path` and is not a regular file (or a symlink to one) is refused:
    the atomic write renames a new file over it, which would replace a device node or a FIFO
    (`-o /dev/null` run as root) with a regular file.
    """
    dest = Path(path)
    if dest.is_dir():
        raise UsageError(f"{dest}: output path is a directory")
    if (dest.exists() or dest.is_symlink()) and not dest.is_file():
        kind = "a broken symlink" if not dest.exists() else "not a regular file"
        raise UsageError(f"{dest}: output path exists and is {kind}; choose a file path")
    folder = dest.parent
    if not folder.is_dir():
        raise UsageError(f"{dest}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{dest}: output folder {folder} is not writable")
    return dest


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write `model` to `path` atomically; large models get a `<name>.data` external-data file."""
    dest = check_output_path(path)
    folder = dest.parent
    large = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD if _can_size(model) else True
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = dest.name + ".data"
    tmp_data = folder / (f".{data_name}.tmp")
    try:
        if large:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(
                to_save,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=tmp_data.name,
                size_threshold=1024,
            )
            # The model refers to the data file by name; rename the data to its final name
            # and rewrite the reference before the model file itself goes into place.
            _relocate_external_data(tmp, tmp_data.name, data_name)
            os.replace(tmp_data, folder / data_name)
        else:
            onnx.save_model(model, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # the usual permissions, as cp gives, not mkstemp's 0600
        os.replace(tmp, dest)
    except OSError as exc:
        raise UsageError(f"{dest}: cannot write output ({exc.strerror or exc})") from None
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()
    logger.info("wrote %s", dest)
    return dest


def _relocate_external_data(model_path: Path, old: str, new: str) -> None:
    m = onnx.load(str(model_path), load_external_data=False)
    for tensor in _all_tensors(m):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(m, str(model_path))


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
    except Exception:
        return False
    return True


def named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where every node has a name unique in the model.

    An unnamed node becomes `<op_type>_<index>` (its position in its graph), suffixed `_1`,
    `_2`, ... on a clash: lossy stages name units so, and their plans and reports use it.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graphs = list(graph_protos(work.graph))
    used = {n.name for g in graphs for n in g.node if n.name}
    for graph in graphs:
        for index, node in enumerate(graph.node):
            if node.name:
                continue
            name = f"{node.op_type}_{index}"
            suffix = 1
            while name in used:
                name = f"{node.op_type}_{index}_{suffix}"
                suffix += 1
            node.name = name
            used.add(name)
    return work


class NameAllocator:
    """Fresh tensor and node names, unique across the whole model (subgraphs see outer names).

    Rewrites that add nodes and tensors (Q/DQ pairs, Casts, smoothing Muls) take their names
    from one allocator per model: `new(hint)` returns `hint`, or `hint_1`, `hint_2`, ... when
    the name is taken.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        for g in graph_protos(model.graph):
            self.used.update(t.name for t in g.initializer)
            self.used.update(v.name for v in (*g.input, *g.output, *g.value_info))
            for node in g.node:
                self.used.add(node.name)
                self.used.update(node.input)
                self.used.update(node.output)

    def new(self, hint: str) -> str:
        name, i = hint, 1
        while name in self.used:
            name, i = f"{hint}_{i}", i + 1
        self.used.add(name)
        return name


def with_outputs(
    model: onnx.ModelProto, names: Iterable[str], elem_types: dict[str, int] | None = None
) -> onnx.ModelProto:
    """A copy of `model` with the tensors `names` added as graph outputs (to observe them).

    `elem_types` gives the element type of a name where known; otherwise ORT infers it. Names
    already among the outputs are not added twice; `model` is not modified.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name in have:
            continue
        value = onnx.ValueInfoProto(name=name)
        if elem_types and name in elem_types:
            value.type.tensor_type.elem_type = elem_types[name]
        copy.graph.output.append(value)
        have.add(name)
    return copy


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically (temp file beside it, fsync, rename); raises OSError.

    The file gets the usual permissions (umask), unlike a mkstemp file (0600).
    """
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
