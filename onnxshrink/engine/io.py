"""Load and save ONNX models safely.

Loading refuses anything that is not a readable, valid ONNX model, and refuses external-data
locations that point outside the model's own folder. Saving is atomic: the model is written to
a temporary file beside the destination and renamed into place, so a failed write never leaves a
partial file; models over 2 GB are written with external data automatically.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import logging
import math
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
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

    Every tensor counts (`all_tensors`), not only those onnx itself loads: onnx before 1.21
    followed a symlink out of the folder, and a reference it leaves unread (a sparse tensor)
    would be read by whatever loads the model next.
    """
    base = base_dir.resolve()
    for tensor in all_tensors(model):
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


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model holds, wherever it is.

    Initializers and sparse initializers (values and indices) of the main graph, of every
    subgraph and of the training-info graphs; tensors in node attributes (TENSOR, TENSORS,
    SPARSE_TENSOR, SPARSE_TENSORS), in those graphs and in function bodies; and functions'
    attribute defaults. Attribute fields are read by presence, not by the declared attribute
    type, as onnx's own external-data loader reads them.
    """
    return (tensor for tensor, _ in _located_tensors(model))


def _located_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """`all_tensors`, each with where it is, for messages ("attribute 'value' of node 'c'")."""
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


def _check_tensor_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse a tensor whose data does not match its declared type and dims, with one line.

    Every tensor of `all_tensors`, before external data is read (after
    `_check_external_data`): its data type must be one onnx knows, its dims non-negative, and
    its data exactly as long as type and dims say (raw_data in bytes, packed for sub-byte
    types; a typed field in values; external data by its `length`, else the rest of its file
    from `offset`). onnx.checker lets through raw_data longer than the dims need and unknown
    types, which later fail deep inside a rule or ONNX Runtime. Nothing is read from external
    files, and raw_data's length is taken without keeping a copy.
    """
    known = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    for tensor, where in _located_tensors(model):
        if _unset(tensor):  # an unset sub-message (a sparse tensor's missing part)
            continue
        if where.startswith("initializer"):
            label = f"tensor {tensor.name!r}"
        else:
            label = f"tensor {tensor.name!r} ({where})" if tensor.name else f"the tensor of {where}"
        if tensor.data_type not in known:
            raise ModelLoadError(f"{label} has unknown data type {tensor.data_type}")
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{label} has a negative dim: {list(tensor.dims)}")
        if tensor.HasField("segment"):
            continue  # one segment of a tensor split across protos: no whole size to check
        type_name = onnx.TensorProto.DataType.Name(tensor.data_type)
        count = math.prod(tensor.dims)
        fields = [f for f in _DATA_FIELDS if f != "raw_data" and len(getattr(tensor, f))]
        if tensor.HasField("raw_data") or uses_external_data(tensor):
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
            have = _raw_length(tensor, base_dir)
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


def _unset(tensor: onnx.TensorProto) -> bool:
    """True for a TensorProto with nothing in it (ByteSize would encode a whole weight)."""
    return not (
        tensor.data_type
        or len(tensor.dims)
        or tensor.name
        or tensor.HasField("raw_data")
        or len(tensor.external_data)
        or any(len(getattr(tensor, f)) for f in _DATA_FIELDS if f != "raw_data")
    )


def _raw_length(tensor: onnx.TensorProto, base_dir: Path) -> int:
    """Bytes of a tensor's raw data: in the file (what onnx will read) or in the message."""
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        if info.length is not None:
            return int(info.length)
        size = (base_dir / info.location).stat().st_size
        return max(0, size - int(info.offset or 0))
    return len(tensor.raw_data)


def _check_all_external_data_read(model: onnx.ModelProto) -> None:
    """After loading: refuse an external-data reference onnx left unread (a sparse tensor, a
    function's attribute default, a training graph), which every later tool would trip on."""
    for tensor, where in _located_tensors(model):
        if uses_external_data(tensor):
            raise ModelLoadError(
                f"tensor {tensor.name!r} ({where}) keeps external data where onnx does not "
                "read it; not supported"
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


def load_model(
    path: str | os.PathLike[str], check: bool = True, data_files: list[Path] | None = None
) -> onnx.ModelProto:
    """Load an ONNX model with its external data; raise ModelLoadError with one clear line.

    The file is only read, never modified. The checker runs before the external data is read,
    on the model's structure only, so a model over protobuf's 2 GB limit loads too.
    `data_files`, when given, receives the external-data files the model reads (resolved).
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
        _check_tensor_data(model, p.parent)
        _check_value_types(model)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{p}: {exc}") from None
    if check:
        try:
            # With external data the checker reads the file (it finds the data beside it and
            # needs no 2 GB message); without, the model in memory is the whole model.
            has_external = any(uses_external_data(t) for t in all_tensors(model))
            onnx.checker.check_model(str(p) if has_external else model)
        except Exception as exc:
            raise ModelLoadError(f"{p}: invalid ONNX model: {first_line(exc)}") from None
    if data_files is not None:
        data_files.extend(
            sorted(
                {
                    (p.parent / ExternalDataInfo(t).location).resolve()
                    for t in all_tensors(model)
                    if uses_external_data(t)
                }
            )
        )
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot read external data ({first_line(exc)})") from None
    try:
        _check_all_external_data_read(model)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{p}: {exc}") from None
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


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], avoid: Iterable[Path] = ()
) -> Path:
    """Write `model` to `path` atomically; a model over 2 GB gets an external-data file beside it.

    1. Both files are written unnamed (O_TMPFILE where the filesystem has it), so a process
       killed while writing leaves nothing behind; each gets its name only when complete.
    2. The data file is `<name>.data`, unless that is a file in `avoid` (the input model's
       own data files: renaming over one would break the input), then `<name>.1.data`, ...
    3. The data file and then the model are renamed into place under an exclusive lock on the
       folder, so two writers to one path never leave a model beside the other's data.
    4. The model is never modified, nor copied whole (see `_write_model`).
    """
    dest = check_output_path(path)
    folder = dest.parent
    data_name = (
        _data_file_name(dest, avoid) if model_bytes(model) > _EXTERNAL_DATA_THRESHOLD else None
    )
    try:
        with ExitStack() as files:
            model_file = files.enter_context(_NewFile(folder))
            data_file = files.enter_context(_NewFile(folder)) if data_name else None
            _write_model(model, model_file.fd, data_file.fd if data_file else None, data_name)
            with _folder_lock(folder):
                if data_file is not None and data_name is not None:
                    data_file.commit(folder / data_name)
                model_file.commit(dest)
    except OSError as exc:
        raise UsageError(f"{dest}: cannot write output ({exc.strerror or exc})") from None
    logger.info("wrote %s%s", dest, f" with external data {data_name}" if data_name else "")
    return dest


def write_model_files(model: onnx.ModelProto, dest: Path, data_name: str | None) -> None:
    """Write `model` to `dest` (not atomically: a scratch copy), tensors over 1 KB to `data_name`
    beside it when given. The model is not modified."""
    with open(dest, "wb") as f:
        if data_name is None:
            _write_model(model, f.fileno(), None, None)
            return
        with open(dest.parent / data_name, "wb+") as data:
            _write_model(model, f.fileno(), data.fileno(), data_name)


#: models over this many bytes reach ONNX Runtime as a file with a data file, not as bytes:
#: no serialized copy in memory, and no 2 GB protobuf limit
SESSION_FILE_BYTES = 256 * 2**20


#: intra-op threads for every session this process makes (`set_session_threads`); None: ORT's
#: default (one per core)
_SESSION_THREADS: int | None = None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it): what a worker
    pool divides among its workers (`set_session_threads`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_session_threads(threads: int | None) -> None:
    """Give every ONNX Runtime session this process makes from now on `threads` intra-op threads.

    For a worker that was given a share of the machine (`onnxshrink.fleet`): ORT ignores
    `OMP_NUM_THREADS` and starts one thread per core, so N workers on N cores would run N*N
    threads. `apply_session_threads` applies it to the SessionOptions onnxshrink makes; a
    session whose options already name a thread count (e.g. `bench --threads`) keeps it.
    None (or 0) restores ORT's default.
    """
    global _SESSION_THREADS
    if threads is not None and threads < 0:
        raise ValueError(f"session threads must be >= 0, not {threads}")
    _SESSION_THREADS = threads or None


def session_threads() -> int | None:
    """The count `set_session_threads` set in this process (None: ORT's default)."""
    return _SESSION_THREADS


def apply_session_threads(options: Any) -> Any:
    """`options` (an onnxruntime.SessionOptions) with the process-wide thread count applied
    where the options leave the count to ORT (0); returned for chaining."""
    if _SESSION_THREADS and not options.intra_op_num_threads:
        options.intra_op_num_threads = _SESSION_THREADS
    return options


def inference_session(
    model: onnx.ModelProto | str | os.PathLike[str], options: Any, providers: list[str]
) -> Any:
    """An onnxruntime.InferenceSession of `model` (a path, or a model in memory of any size).

    A large model is written to a scratch folder with its weights in a data file and loaded
    from there (the folder is removed once the session holds the weights). The process-wide
    thread count (`set_session_threads`) is applied to `options`.
    """
    import onnxruntime as ort

    apply_session_threads(options)
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=providers)
    stores = {_store_of(t) for t in model.graph.initializer} - {None}
    if not stores and model_bytes(model) <= SESSION_FILE_BYTES:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    if len(stores) == 1:
        # offloaded weights stay where they are: the model file goes beside them
        (folder,) = stores
        assert folder is not None
        stem = f"session-{secrets.token_hex(6)}"
        path, data = folder / f"{stem}.onnx", folder / f"{stem}.data"
        try:
            with open(path, "wb") as f, open(data, "wb+") as d:
                _write_model(model, f.fileno(), d.fileno(), data.name, keep_offloaded=True)
            return ort.InferenceSession(str(path), options, providers=providers)
        finally:
            path.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxshrink-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_model_files(model, path, "model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=providers)


#: tensors over this many bytes go to the data file when a model is written with external data
_EXTERNAL_TENSOR_BYTES = 1024
#: offsets in the data file are multiples of this (ORT can then map weights from the file)
_DATA_ALIGNMENT = 4096


def _write_model(
    model: onnx.ModelProto,
    model_fd: int,
    data_fd: int | None,
    data_name: str | None,
    keep_offloaded: bool = False,
) -> None:
    """Serialize `model` to `model_fd`; with `data_fd`, its large initializers' bytes go there.

    The model is never modified or copied whole: the file gets a skeleton (`skeleton`) whose
    large initializers point into the data file, and their bytes are written one tensor at a
    time. (Clearing and refilling the tensors in place would not do: protobuf keeps a cleared
    field's memory until the whole message is freed, so every write would grow the model.)
    Offloaded tensors (`offload`) are copied from their scratch file to the data file without
    passing through memory, or with `keep_offloaded` (a file written into the scratch folder)
    keep pointing where they are. Without a data file, a large model is written one tensor at
    a time (`_write_streamed`), never as one serialized copy.
    """
    if data_fd is None:
        if model_bytes(model) > SESSION_FILE_BYTES:
            _write_streamed(model, model_fd)
            return
        if any(_store_of(t) for t in model.graph.initializer):
            model = materialize(model)
        _write_all(model_fd, model.SerializeToString())
        return
    assert data_name is not None
    externalize = _external_writer(data_fd, data_name, keep_offloaded)
    _write_all(model_fd, skeleton(model, externalize).SerializeToString())


def _write_streamed(model: onnx.ModelProto, fd: int) -> None:
    """`model` serialized to `fd` as `SerializeToString` would, without holding its bytes.

    Protobuf fields may come in any order and a repeated field's elements anywhere in its
    message, so the file is the model without its graph, then the graph field: its tag, its
    length, the graph without its initializers, and each initializer as its own field,
    serialized one at a time (an offloaded one read from its scratch file). The graph's length
    is summed from the tensors' sizes beforehand, without encoding them.
    """
    head = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(head, field, value)
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    graph_bytes = graph.SerializeToString()
    del graph
    init_tag = _tag(onnx.GraphProto, "initializer")
    sizes = [_tensor_size(t) for t in model.graph.initializer]
    body = len(graph_bytes) + sum(len(init_tag) + len(_varint(n)) + n for n in sizes)
    _write_all(fd, head.SerializeToString())
    _write_all(fd, _tag(onnx.ModelProto, "graph") + _varint(body) + graph_bytes)
    for tensor, size in zip(model.graph.initializer, sizes, strict=True):
        stored = _store_of(tensor)
        if stored is not None:
            loaded = onnx.TensorProto()
            loaded.CopyFrom(tensor)
            loaded.ClearField("data_location")
            del loaded.external_data[:]
            path, offset, length = _stored_range(tensor, stored)
            with open(path, "rb") as f:
                loaded.raw_data = os.pread(f.fileno(), length, offset)
            tensor = loaded
        data = tensor.SerializeToString()
        assert len(data) == size, (tensor.name, len(data), size)
        _write_all(fd, init_tag + _varint(size) + data)
        del data


def _tensor_size(tensor: onnx.TensorProto) -> int:
    """The serialized size of `tensor`, with an offloaded one's bytes counted as loaded."""
    stored = _store_of(tensor)
    if stored is None:
        return tensor.ByteSize()
    stub = onnx.TensorProto()
    stub.CopyFrom(tensor)
    stub.ClearField("data_location")
    del stub.external_data[:]
    length = _stored_range(tensor, stored)[2]
    raw_tag = _tag(onnx.TensorProto, "raw_data")
    return stub.ByteSize() + len(raw_tag) + len(_varint(length)) + length


def _tag(message: Any, field: str) -> bytes:
    """The key of a length-delimited field (wire type 2) of `message`'s type."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _external_writer(
    data_fd: int, data_name: str, keep_offloaded: bool = False
) -> Callable[[onnx.TensorProto, onnx.TensorProto], None]:
    """A `skeleton` callback that appends each large tensor's bytes to `data_fd` (4096-aligned)
    and points its stub at them as `data_name`; offloaded tensors are copied file to file, or
    with `keep_offloaded` left pointing at their scratch file."""
    offset = 0

    def externalize(tensor: onnx.TensorProto, stub: onnx.TensorProto) -> None:
        nonlocal offset
        stored = _store_of(tensor)
        if stored is not None and keep_offloaded:
            stub.CopyFrom(tensor)
            return
        offset = -(-offset // _DATA_ALIGNMENT) * _DATA_ALIGNMENT
        if stored is not None:
            length = _copy_range(*_stored_range(tensor, stored), data_fd, offset)
        else:
            raw = (
                tensor.raw_data
                if tensor.HasField("raw_data")
                else onnx.numpy_helper.to_array(tensor).tobytes()
            )
            _pwrite_all(data_fd, raw, offset)
            length = len(raw)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", data_name),
            ("offset", str(offset)),
            ("length", str(length)),
        ):
            stub.external_data.add(key=key, value=value)
        offset += length

    return externalize


# ---------------------------------------------------------------------------------------------
# Offloaded weights (issue 9, 4)
# ---------------------------------------------------------------------------------------------

#: data file name -> the scratch folder holding it, for every live `offload`
_STORES: dict[str, Path] = {}


def offload(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """A copy of `model` whose large initializers live in a data file in `folder`, not in memory.

    For a large model's lossy stage: the float weights are read many times (each candidate the
    budget search builds quantizes them) but are otherwise only needed by ONNX Runtime, which
    reads them from a file. Offloaded, they leave Python's memory to the float sessions, which
    then cost what the model costs, not twice that. `array_of` reads an offloaded tensor,
    `inference_session` and `save_model` take such a model as they take any, and `materialize`
    loads it back; `discard_store(folder)` ends the store (its models can no longer be read).
    The caller drops `model`: protobuf frees its bytes only with the whole message.
    """
    name = f"onnxshrink-{secrets.token_hex(6)}.data"
    with open(folder / name, "wb") as data:
        light = skeleton(
            model, _external_writer(data.fileno(), name), threshold=_OFFLOAD_TENSOR_BYTES
        )
    _STORES[name] = folder
    return light


#: `offload` moves initializers over this many bytes (the rest are read too often to be worth it)
_OFFLOAD_TENSOR_BYTES = 2**16


def discard_store(folder: Path) -> None:
    """Forget the offloaded data files in `folder` (the caller removes the folder)."""
    for name in [n for n, f in _STORES.items() if f == folder]:
        del _STORES[name]


def _store_of(tensor: onnx.TensorProto) -> Path | None:
    """The scratch folder of an offloaded tensor, or None."""
    if not uses_external_data(tensor):
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return _STORES.get(entry.value)
    return None


def _stored_range(tensor: onnx.TensorProto, folder: Path) -> tuple[Path, int, int]:
    """The scratch file, offset and length of an offloaded tensor (`offload` sets all three)."""
    info = ExternalDataInfo(tensor)
    assert info.offset is not None and info.length is not None  # written by offload
    return folder / info.location, info.offset, info.length


def array_of(tensor: onnx.TensorProto) -> Any:
    """`onnx.numpy_helper.to_array`, for offloaded tensors too (read from their scratch file)."""
    stored = _store_of(tensor)
    return onnx.numpy_helper.to_array(tensor, str(stored) if stored is not None else "")


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its offloaded tensors' bytes back in memory (a new model; `model` is kept)."""

    def load(tensor: onnx.TensorProto, stub: onnx.TensorProto) -> None:
        stored = _store_of(tensor)
        if stored is None:
            stub.CopyFrom(tensor)
            return
        path, offset, length = _stored_range(tensor, stored)
        with open(path, "rb") as f:
            stub.raw_data = os.pread(f.fileno(), length, offset)

    # every tensor through `load`: an offloaded one may be under skeleton's default threshold
    return skeleton(model, load, threshold=0)


def _copy_range(source: Path, offset: int, length: int, dest_fd: int, dest_offset: int) -> int:
    """Copy `length` bytes at `offset` of `source` to `dest_fd` at `dest_offset`, in the kernel
    where it can (`os.copy_file_range`), in 16 MB pieces otherwise; the count copied."""
    with open(source, "rb") as f:
        done = 0
        while done < length:
            want = min(length - done, 2**24)
            try:
                n = os.copy_file_range(f.fileno(), dest_fd, want, offset + done, dest_offset + done)
            except (AttributeError, OSError):
                chunk = os.pread(f.fileno(), want, offset + done)
                _pwrite_all(dest_fd, chunk, dest_offset + done)
                n = len(chunk)
            if n <= 0:
                raise OSError(errno.EIO, f"{source} ends before the offloaded tensor does")
            done += n
    return length


def skeleton(
    model: onnx.ModelProto,
    large: Callable[[onnx.TensorProto, onnx.TensorProto], None] | None = None,
    threshold: int = _EXTERNAL_TENSOR_BYTES,
) -> onnx.ModelProto:
    """A copy of `model` without the data of its initializers over `threshold` bytes.

    Those keep their name, dtype and dims, so the copy describes the graph (inputs, shapes,
    table sizes) but cannot run; `large(tensor, stub)` may fill each stub (with an external
    data reference, say). Only the main graph's initializers are left out: subgraph weights
    are small in practice and come along with their nodes. Never copies a large tensor.
    """
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.STRING or tensor_bytes(tensor) <= threshold:
            out.graph.initializer.append(tensor)
            continue
        stub = out.graph.initializer.add()
        stub.name = tensor.name
        stub.data_type = tensor.data_type
        stub.dims.extend(tensor.dims)
        if tensor.HasField("doc_string"):
            stub.doc_string = tensor.doc_string
        if large is not None:
            large(tensor, stub)
    return out


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """`skeleton(model)` with the large initializers turned into typed graph inputs.

    A valid model of the same graph without the weights' bytes: onnx's checker and shape
    inference take it whatever the model's size (they serialize what they are given).
    """
    stubs: list[onnx.TensorProto] = []
    light = skeleton(model, lambda _tensor, stub: stubs.append(stub))
    names = {s.name for s in stubs}
    kept = [t for t in light.graph.initializer if t.name not in names]
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    declared = {v.name for v in light.graph.input}
    for stub in stubs:
        if stub.name not in declared:
            light.graph.input.append(
                onnx.helper.make_tensor_value_info(stub.name, stub.data_type, list(stub.dims))
            )
    return light


def _copy_field(dst: Any, field: Any, value: Any) -> None:
    if field.is_repeated:
        getattr(dst, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size, from its tensors' dims where they hold raw bytes.

    Never `model.ByteSize()` on a large model: protobuf (upb) computes it by encoding the
    whole message, which for 2 GB of weights takes seconds and doubles the memory held (and
    fails past 2 GB). Exact for models under `SESSION_FILE_BYTES`; above, within a few bytes
    per tensor.
    """
    total = 0
    for graph in graph_protos(model.graph):
        total += sum(tensor_bytes(t) for t in graph.initializer)
        total += sum(n.ByteSize() for n in graph.node if n.op_type != "Constant")
        total += sum(
            tensor_bytes(a.t)
            for n in graph.node
            if n.op_type == "Constant"
            for a in n.attribute
            if a.type == onnx.AttributeProto.TENSOR
        )
        total += sum(v.ByteSize() for v in (*graph.input, *graph.output, *graph.value_info))
    total += sum(f.ByteSize() for f in model.functions)
    return model.ByteSize() if total < SESSION_FILE_BYTES else total  # small: exact, cheap


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's serialized size, from its dims when it holds raw bytes (no encoding) or keeps
    them in a data file (`uses_external_data`: the size it has once loaded)."""
    if tensor.HasField("raw_data") or uses_external_data(tensor):
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except Exception:  # a type numpy lacks: let protobuf size it
            return tensor.ByteSize()
        count = 1
        for d in tensor.dims:
            count *= d
        return count * itemsize + len(tensor.name) + 16
    return tensor.ByteSize()


def _data_file_name(dest: Path, avoid: Iterable[Path]) -> str:
    """`<dest>.data`, or `<dest>.N.data` when that name is one of the files in `avoid`."""
    taken = {p.resolve() for p in avoid}
    name, n = f"{dest.name}.data", 0
    while (dest.parent / name).resolve() in taken:
        n += 1
        name = f"{dest.name}.{n}.data"
    return name


class _NewFile:
    """A file written without a name, linked into place by `commit` only once complete.

    With O_TMPFILE (Linux) the file has no name at all until `commit`, so a process killed
    while writing leaves nothing; elsewhere it is a hidden `.onnxshrink.*.tmp` file, removed
    on any failure.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd = -1
        self.named: Path | None = None
        try:
            self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
        except (AttributeError, OSError) as exc:  # no O_TMPFILE on this system or filesystem
            if isinstance(exc, OSError) and exc.errno not in _NO_TMPFILE:
                raise
            self.named = folder / f".onnxshrink.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            self.fd = os.open(self.named, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)

    def __enter__(self) -> _NewFile:
        return self

    def commit(self, dest: Path) -> None:
        """Flush the file to disk and rename it to `dest` (replacing what is there)."""
        os.fsync(self.fd)
        if self.named is None:
            self.named = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.tmp"
            # linkat(AT_SYMLINK_FOLLOW) through /proc gives the unnamed file its name; a plain
            # link() would try to link the /proc symlink itself (EXDEV)
            proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(str(self.fd), self.named, src_dir_fd=proc, follow_symlinks=True)
            finally:
                os.close(proc)
        os.replace(self.named, dest)
        self.named = None

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if self.named is not None:
            self.named.unlink(missing_ok=True)


_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file left behind), where supported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        # a filesystem without flock: the renames are still atomic one by one
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where every node has a name unique in the model.

    An unnamed node becomes `<op_type>_<index>` (its position in its graph), suffixed `_1`,
    `_2`, ... on a clash: lossy stages name units so, and their plans and reports use it.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return name_nodes(work)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name every unnamed node of `model` in place, as `named_copy` does; returns `model`."""
    work = model
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
    _add_outputs(copy, names, elem_types)
    return copy


@contextmanager
def outputs_added(
    model: onnx.ModelProto, names: Iterable[str], elem_types: dict[str, int] | None = None
) -> Iterator[onnx.ModelProto]:
    """`model` itself with the tensors `names` added as graph outputs, for the `with` block.

    What `with_outputs` gives without copying the model (a large model's weights): make the
    session inside the block; the outputs are taken off again when it ends.
    """
    count = len(model.graph.output)
    _add_outputs(model, names, elem_types)
    try:
        yield model
    finally:
        del model.graph.output[count:]


def _add_outputs(
    model: onnx.ModelProto, names: Iterable[str], elem_types: dict[str, int] | None
) -> None:
    have = {o.name for o in model.graph.output}
    for name in names:
        if name in have:
            continue
        value = model.graph.output.add(name=name)
        if elem_types and name in elem_types:
            value.type.tensor_type.elem_type = elem_types[name]
        have.add(name)


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when every node (subgraphs too) has a name, else `named_copy(model)`.

    For callers that only read: a model named once (as lossy stages do first) is not copied
    again on every call, which for a large model is a copy of all its weights.
    """
    if all(n.name for g in graph_protos(model.graph) for n in g.node):
        return model
    return named_copy(model)


def release_memory() -> None:
    """Collect garbage cycles and hand freed heap memory back to the OS (glibc `malloc_trim`).

    For large models, between phases: a rewrite's graph is a web of cycles that only the
    collector frees, and glibc keeps freed blocks below its mmap threshold (an int8 weight of
    16 MB, say) in the heap unless asked to trim; both count in the process's memory.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim() -> Any:
    global _TRIM
    if _TRIM is False:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = None
    return _TRIM


_TRIM: Any = False


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
