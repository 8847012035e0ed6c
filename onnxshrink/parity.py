"""Numerical parity between a reference model and a rewritten one, with ONNX Runtime CPU.

Both models run on the same feeds; each output is compared by its relative error, defined as
`max|cand - ref| / max(max|ref|, tiny)`: the largest deviation measured against the output's own
scale, so that near-zero elements do not blow the figure up. An output passes when
`max|cand - ref| <= atol + rtol * max|ref|`; the small default `atol` (1e-6) only matters for
outputs that are nearly zero everywhere (e.g. a detector's map on random noise), where float32
rounding alone gives a large relative figure. Integer and bool outputs must match exactly. Each
model gets one session for all feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6
# Unknown non-batch dims of generated inputs; small enough to be fast, large enough for most
# downsampling stacks (5 stride-2 stages leave 1x1).
DEFAULT_DYNAMIC_DIM = 32

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class OutputParity:
    """How far one output moved."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class ParityReport:
    """The outcome of a parity run; `verified` is False when the models could not be run."""

    verified: bool
    passed: bool
    rtol: float
    atol: float = DEFAULT_ATOL
    samples: int = 0
    outputs: list[OutputParity] = field(default_factory=list)
    reason: str | None = None


def _session(model: onnx.ModelProto | str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 0
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


def _int_input_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs read by Gather (token ids), the table size along the gathered axis."""
    inits = {t.name: t for t in model.graph.initializer}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = inits[node.input[0]].dims
        if dims:
            size = dims[axis]
            bounds[node.input[1]] = min(bounds.get(node.input[1], size), size)
    return bounds


def generate_inputs(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    batch: int = 1,
) -> dict[str, np.ndarray]:
    """One feed of random inputs: floats in [0, 1), integers within safe ranges.

    Unknown dims: `batch` for axis 0, DEFAULT_DYNAMIC_DIM elsewhere, unless `input_shapes` pins
    them. Integer inputs that index an embedding table stay below its size; others are 0 or 1
    (masks, type ids).
    """
    rng = np.random.default_rng(seed)
    input_shapes = input_shapes or {}
    initializer_names = {t.name for t in model.graph.initializer}
    bounds = _int_input_bounds(model)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if value.name in input_shapes:
            shape = list(input_shapes[value.name])
        else:
            shape = [
                d.dim_value
                if d.HasField("dim_value") and d.dim_value > 0
                else (batch if i == 0 else DEFAULT_DYNAMIC_DIM)
                for i, d in enumerate(tensor_type.shape.dim)
            ]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.random(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            high = bounds.get(value.name, 2)
            feeds[value.name] = rng.integers(0, high, size=shape).astype(dtype)
    return feeds


def load_inputs(path: str | Path, input_names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Feeds from an .npz (one array per input) or a folder of .npz files, one file at a time."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise UsageError(f"--inputs {p}: folder holds no .npz files")
    elif p.is_file():
        files = [p]
    else:
        raise UsageError(f"--inputs {p}: no such file or folder")
    for f in files:
        try:
            data = np.load(f, allow_pickle=False)
        except Exception as exc:
            raise UsageError(f"--inputs {f}: not a readable .npz file ({exc})") from None
        with data:
            missing = [n for n in input_names if n not in data.files]
            if missing:
                raise UsageError(
                    f"--inputs {f}: no array for model input(s) {', '.join(missing)} "
                    f"(file has {', '.join(data.files) or 'nothing'})"
                )
            yield {n: np.asarray(data[n]) for n in input_names}


def compare_outputs(
    name: str, ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float = DEFAULT_ATOL
) -> OutputParity:
    """Relative error of one output (see the module docstring)."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    if ref.shape != cand.shape:
        return OutputParity(name, float("inf"), float("inf"), False)
    if not np.issubdtype(ref.dtype, np.floating):
        equal = bool(np.array_equal(ref, cand))
        diff = (
            0.0
            if equal
            else float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64))))
        )
        return OutputParity(name, diff, 0.0 if equal else float("inf"), equal)
    ref64 = ref.astype(np.float64)
    diff = np.abs(cand.astype(np.float64) - ref64)
    if ref.size == 0:
        return OutputParity(name, 0.0, 0.0, True)
    finite = np.isfinite(ref64)
    if not np.array_equal(finite, np.isfinite(cand.astype(np.float64))):
        return OutputParity(name, float("inf"), float("inf"), False)
    if not finite.all():
        diff = np.where(finite, diff, 0.0)
        ref64 = np.where(finite, ref64, 0.0)
    max_abs = float(diff.max())
    scale = max(float(np.abs(ref64).max()), np.finfo(np.float32).tiny)
    max_rel = max_abs / scale
    return OutputParity(name, max_abs, max_rel, max_abs <= atol + rtol * scale)


class Reference:
    """The original model's session and outputs, reused when several candidates are checked.

    Outputs are cached per feed position while they fit in `cache_bytes`; past that they are
    recomputed, so a long stream of inputs never piles up in memory.
    """

    def __init__(self, model: onnx.ModelProto | str | Path, cache_bytes: int = 256 * 2**20):
        self.model = model
        self.cache_bytes = cache_bytes
        self._session = None
        self._cache: dict[int, list[np.ndarray]] = {}
        self._cached = 0

    @property
    def session(self):
        """The ORT session, created on first use (raises what ORT raises)."""
        if self._session is None:
            self._session = _session(self.model)
        return self._session

    def run(self, index: int, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for the feed at position `index` of the stream."""
        if index in self._cache:
            return self._cache[index]
        outputs = self.session.run(None, feed)
        size = sum(np.asarray(o).nbytes for o in outputs)
        if self._cached + size <= self.cache_bytes:
            self._cache[index] = outputs
            self._cached += size
        return outputs


def check_parity(
    reference: Reference | onnx.ModelProto | str | Path,
    candidate: onnx.ModelProto | str | Path,
    feeds: Iterable[dict[str, np.ndarray]],
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    stop_on_failure: bool = False,
) -> ParityReport:
    """Run both models on every feed and compare each output; never raises for ORT failures.

    Pass a `Reference` to reuse the original's session and outputs across candidates; the feeds
    must then come in the same order each time. `stop_on_failure` ends at the first feed on
    which an output fails (the report then covers the feeds seen so far).
    """
    ref = reference if isinstance(reference, Reference) else Reference(reference, cache_bytes=0)
    try:
        ref_sess = ref.session
    except Exception as exc:
        return ParityReport(
            False,
            False,
            rtol,
            atol,
            reason=f"ONNX Runtime cannot load the original model: {_first_line(exc)}",
        )
    try:
        cand_sess = _session(candidate)
    except Exception as exc:
        return ParityReport(
            False,
            False,
            rtol,
            atol,
            reason=f"ONNX Runtime cannot load the optimized model: {_first_line(exc)}",
        )
    names = [o.name for o in ref_sess.get_outputs()]
    if names != [o.name for o in cand_sess.get_outputs()]:
        return ParityReport(True, False, rtol, atol, reason="output names differ")
    worst: dict[str, OutputParity] = {}
    samples = 0
    for index, feed in enumerate(feeds):
        try:
            ref_out = ref.run(index, feed)
        except Exception as exc:
            shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
            return ParityReport(
                False,
                False,
                rtol,
                atol,
                samples,
                reason=f"the original model fails on the inputs ({shapes}): {_first_line(exc)}; "
                "pass --input-shape or --inputs",
            )
        try:
            cand_out = cand_sess.run(None, feed)
        except Exception as exc:
            return ParityReport(
                True,
                False,
                rtol,
                atol,
                samples,
                reason=f"the optimized model fails where the original runs: {_first_line(exc)}",
            )
        samples += 1
        for name, r, c in zip(names, ref_out, cand_out, strict=True):
            result = compare_outputs(name, r, c, rtol, atol)
            # Keep the worst sample per output; a failure always outranks a pass.
            if name not in worst or (result.ok, -result.max_rel) < (
                worst[name].ok,
                -worst[name].max_rel,
            ):
                worst[name] = result
        if stop_on_failure and not all(w.ok for w in worst.values()):
            break
    if samples == 0:
        return ParityReport(False, False, rtol, atol, 0, reason="no inputs to compare on")
    outputs = [worst[n] for n in names]
    return ParityReport(True, all(o.ok for o in outputs), rtol, atol, samples, outputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # ORT prefixes messages with "[ONNXRuntimeError] : 10 : INVALID_GRAPH : ..."
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:400]
