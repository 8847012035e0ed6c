"""Load and save ONNX models safely.

Loading refuses anything that is not a readable, valid ONNX model, and refuses external-data
locations that point outside the model's own folder. Saving is atomic: the model is written to
a temporary file beside the destination and renamed into place, so a failed write never leaves a
partial file; models over 2 GB are written with external data automatically.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from onnxshrink.errors import ModelLoadError, UsageError, first_line

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    base = base_dir.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (base / location).resolve()
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
    """Initializers and Constant-node tensors of the main graph and every subgraph."""
    for graph in graph_protos(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


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
    _check_external_data(model, p.parent)
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot read external data ({first_line(exc)})") from None
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
