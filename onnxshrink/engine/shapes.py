"""Shape inference and input-shape pinning.

`--input-shape name:1,3,48,320` pins a graph input's dims (the output model keeps that shape,
since shape computations get folded for it). Inference is onnx's own, with symbolic dims kept.
"""

from __future__ import annotations

import logging

import onnx

from onnxshrink.engine.io import (
    SESSION_FILE_BYTES,
    all_tensors,
    model_bytes,
    skeleton,
    structure_only,
)
from onnxshrink.errors import UsageError, first_line

logger = logging.getLogger(__name__)


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """Parse `NAME:DIMS` strings; raise UsageError (one line) with the bad spec named.

    DIMS in any of the three spellings users bring: `1,3,224,224`, Polygraphy's
    `[1,3,224,224]` and trtexec's `1x3x224x224`. NAME may itself hold colons (`input:0`).
    """
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise UsageError(
                f"bad --input-shape {spec!r}: expected NAME:DIMS, e.g. x:1,3,224,224, "
                "x:[1,3,224,224] or x:1x3x224x224"
            )
        dims = dims.strip()
        if dims.startswith("[") != dims.endswith("]"):
            raise UsageError(f"bad --input-shape {spec!r}: unbalanced brackets")
        dims = dims.removeprefix("[").removesuffix("]")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip() != ""]
        except ValueError:
            raise UsageError(
                f"bad --input-shape {spec!r}: dims must be integers, e.g. x:1,3,224,224"
            ) from None
        if any(v <= 0 for v in values):
            raise UsageError(f"bad --input-shape {spec!r}: dims must be positive")
        if any(v >= 2**63 for v in values):
            raise UsageError(f"bad --input-shape {spec!r}: a dim does not fit in int64")
        shapes[name] = values
    return shapes


def pin_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Set the dims of the named graph inputs in place; check names and ranks."""
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            known = ", ".join(inputs) or "none"
            raise UsageError(f"--input-shape names {name!r}, which is not a model input ({known})")
        tensor_type = inputs[name].type.tensor_type
        if tensor_type.HasField("shape") and len(tensor_type.shape.dim) not in (0, len(dims)):
            raise UsageError(
                f"--input-shape {name}: model input has rank {len(tensor_type.shape.dim)}, "
                f"got {len(dims)} dims"
            )
        existing = list(tensor_type.shape.dim)
        for i, value in enumerate(dims):
            fixed = (
                i < len(existing)
                and existing[i].HasField("dim_value")
                and existing[i].dim_value > 0
            )
            if fixed and existing[i].dim_value != value:
                raise UsageError(
                    f"--input-shape {name}: dim {i} is fixed at {existing[i].dim_value} in the model, got {value}"
                )
        tensor_type.shape.Clear()
        for value in dims:
            tensor_type.shape.dim.add().dim_value = value


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation; on failure, the model without new shapes.

    A large model (over `SESSION_FILE_BYTES`) is not serialized whole (onnx's inference copies
    what it is given, and cannot past 2 GB): inference runs on its structure (`structure_only`)
    and the shapes found are set on `model` itself, which is returned.
    """

    large = model_bytes(model) > SESSION_FILE_BYTES
    try:
        inferred = onnx.shape_inference.infer_shapes(
            structure_only(model) if large else model, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # inference is an aid, never a requirement
        logger.info("shape inference failed, continuing without: %s", exc)
        return model
    if not large:
        return inferred
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Raise the ai.onnx opset to `target` with onnx's version converter (never lowers it)."""
    current = default_opset(model)
    if target < current:
        raise UsageError(
            f"--opset {target} is lower than the model's opset {current}; onnxshrink only raises it"
        )
    if target == current:
        return model
    # A large model goes through the converter without its weights (it serializes what it is
    # given; past 2 GB that fails): they are parked, as external data at a name no file has,
    # and put back by name into the converted model (issue 9, 4).
    parked: dict[str, onnx.TensorProto] = {}

    def park(tensor: onnx.TensorProto, stub: onnx.TensorProto) -> None:
        parked[stub.name] = tensor
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value=_PARKED)

    if model_bytes(model) > SESSION_FILE_BYTES:
        model = skeleton(model, park)
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise UsageError(
            f"cannot convert the model from opset {current} to {target}: {first_line(exc)}"
        ) from None
    for tensor in all_tensors(converted) if parked else ():
        if any(e.key == "location" and e.value == _PARKED for e in tensor.external_data):
            if tensor.name not in parked:  # the converter moved a weight elsewhere
                raise UsageError(
                    f"cannot convert the model from opset {current} to {target}: the converter "
                    f"rewrote the weight {tensor.name!r}, which a model this large keeps apart"
                )
            tensor.CopyFrom(parked[tensor.name])
    return converted


#: the external-data location `convert_opset` parks a large model's weights at
_PARKED = "onnxshrink-parked-weights"
