"""`--quantize int4`: block-wise 4-bit weights for MatMul/Gemm layers and Gather tables.

Transformer weights dominate the size of exported language and embedding models: their linear
layers and their word-embedding table. This stage stores them in 4 bits, one scale (and zero
point) per block of `block_size` values along the reduction axis, and leaves the activations in
float. It is a `PlannedStage`: the plan lists the units, the engine's budget search
(`onnxshrink.quant.lossy`) keeps the most sensitive ones float until the output error holds.

1. Units. A MatMul whose second input is a 2-D float initializer `[K, N]`; a Gemm with such a
   weight, alpha 1, no transposed A and a 1-D bias (or none); a Gather (axis 0) from a 2-D
   float initializer `[V, D]` (an embedding table); nodes without a constant weight (attention
   products, index lookups) are not units and are not listed. Declined, with the reason: weights of fewer
   than `MIN_ELEMENTS` values (nothing to gain), a reduction axis shorter than one block, nodes
   in subgraphs or other domains, `--exclude`.
2. The scheme (`onnxshrink.quant.schemes.Scheme`, 4 bits, block granularity): asymmetric uint4
   with a zero point per block by default, or symmetric int4 (`symmetric`). Blocks run along
   K for a MatMul weight (axis 0 of `[K, N]`) and along D for a table (axis 1 of `[V, D]`, so
   that a gathered row is dequantized on its own); a last, shorter block is padded. Scales are
   stored in the weight's float type (what both formats require).
3. Formats, by the target profile's `int4_format`:
   a. `contrib` (ort-cpu, ort-cuda): ONNX Runtime's `com.microsoft` ops. `MatMulNBits` takes B
      as uint8 `[N, k_blocks, block_size / 2]` (the weight transposed, each block's values
      packed two to a byte, the first in the low nibble), scales `[N, k_blocks]` and zero
      points `[N, ceil(k_blocks / 2)]` packed the same way (absent when symmetric: ORT's
      default zero point is 8, so symmetric codes are stored shifted by 8). Attributes K, N,
      bits 4, block_size and `accuracy_level` (4: A quantized to int8 per block inside the
      kernel, ORT's fast path on CPUs with VNNI; 0: float). A Gemm's bias becomes its bias
      input. `GatherBlockQuantized` takes the table as uint4 (int4 when symmetric) `[V, D]`,
      scales and zero points `[V, ceil(D / block_size)]`, gather_axis 0, quantize_axis 1.
      `block_size` must be a power of two, at least 16 (ORT's rule).
   b. `qdq` (tensorrt, and any runtime of opset 21): a standard `DequantizeLinear` with
      `axis` and `block_size` turns the int4 weight back into float for the unchanged MatMul,
      Gemm or Gather. The model is converted to opset 21 first (blocked DequantizeLinear and
      4-bit types need it); a model the converter cannot raise is refused with one line.
4. Methods (`method`):
   a. `rtn`: round to nearest, each block's range from its own values.
   b. `gptq`: error-compensating rounding (Frantar et al., 2022). The Hessian of each layer's
      input, `H = sum x^T x` over the calibration samples (padded positions left out when the
      model has a mask input), is collected in one pass of the float model; then rows of the
      `[K, N]` weight are quantized in order, each one's rounding error spread over the rows
      not yet quantized through the Cholesky factor of `H^-1` (dampened by 1% of its mean
      diagonal; an input that is always 0 gets no weight). A block's scale is taken when its
      first row is reached, from the rows as updated so far. Work is done 128 rows at a time
      with the rest of the matrix updated once per batch. Tables have no input activations:
      they are always rounded to nearest.
   The error budget is measured on the first 32 calibration samples: when there are more
   than 64, GPTQ fits on the others, so that the budget judges samples it did not fit (with
   fewer it fits on all, and a note says the budget's figure is optimistic: with few samples
   against a wide layer, H has low rank and GPTQ fits those samples closely).
   GPTQ runs when the plan is made, on every unit: the Hessians of as many layer inputs as fit
   in `GPTQ_HESSIAN_BYTES` (512 MB) are collected in one pass over the calibration data, their
   units quantized and the Hessians let go, then the next group (a large model takes several
   passes instead of holding every Hessian at once). Each unit's quantized weight is
   computed once per run and reused by every candidate the budget search builds.
5. Budget: the engine's. Declined units stay float; the report lists them with their error.
   Units are declined by error per byte saved (`unit_sizes`), so that an embedding table
   (half of a small encoder's file) is kept float only when nothing smaller will do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxshrink.engine.io import array_of
from onnxshrink.engine.protos import (
    collect_units,
    compile_excludes,
    drop_initializers,
    tensor_readers,
    weight_initializer,
)
from onnxshrink.engine.shapes import convert_opset, default_opset
from onnxshrink.errors import UsageError
from onnxshrink.quant.activations import input_statistics
from onnxshrink.quant.lossy import (
    CalibrationSource,
    Plan,
    PlannedStage,
    StageResult,
    StageSettings,
    as_calibration_data,
)
from onnxshrink.quant.schemes import Scheme
from onnxshrink.quant.sensitivity import DEFAULT_SAMPLES
from onnxshrink.quant.targets import TargetProfile
from onnxshrink.verify.measure import mask_input

logger = logging.getLogger(__name__)

#: the block sizes offered (ORT: a power of two, at least 16)
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
METHODS = ("rtn", "gptq")
#: weights with fewer values stay float (case 1)
MIN_ELEMENTS = 4096
#: the opset of blocked DequantizeLinear with 4-bit types (case 3b)
QDQ_OPSET = 21
#: the clip factors tried on each block's range (case 4c)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
#: GPTQ: dampening of H as a share of its mean diagonal, and rows per lazy batch (case 4b)
GPTQ_DAMP = 0.01
GPTQ_BATCH = 128
#: GPTQ: the Hessians held at once (float64 K x K per layer input); more take more passes
GPTQ_HESSIAN_BYTES = 512 * 2**20
_FLOATS: dict[int, type] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_MS_DOMAIN = "com.microsoft"
#: `_unit`'s reason for a node without a constant weight: not listed among the declined


class NothingToQuantize(UsageError):
    """The model has no unit the stage can change (one line, exit 2; `int8+int4` goes on)."""


def int4_scheme(block_size: int, symmetric: bool) -> Scheme:
    """The stage's scheme (case 2): int4 symmetric or uint4 with zero points, per block."""
    return Scheme(
        4, signed=symmetric, granularity="block", symmetric=symmetric, block_size=block_size
    )


@dataclass(frozen=True)
class _Unit:
    """A node the plan may change (case 1): its op, weight initializer and reduction axis."""

    node: str
    op: str
    weight: str
    activation: str | None  # the MatMul/Gemm input whose Hessian GPTQ needs; None for Gather
    transposed: bool = False  # a Gemm with transB: the weight is stored [N, K]
    reduction: int = 0  # K (D for a table)


@dataclass
class _Quantized:
    """One weight in 4 bits: codes (in the scheme's range), scales, zero points or None."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (values 0..15, or -8..7) packed two to a byte along the last axis, the first
    in the low nibble; an odd last axis is padded with 0."""
    c = np.asarray(codes).astype(np.uint8) & 0x0F
    if c.shape[-1] % 2:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], 1), np.uint8)], axis=-1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int, signed: bool = False) -> np.ndarray:
    """`pack_nibbles` undone: the first `count` codes along the last axis."""
    p = np.asarray(packed, np.uint8)
    codes = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(*p.shape[:-1], -1)[..., :count]
    if signed:
        return np.where(codes > 7, codes.astype(np.int16) - 16, codes).astype(np.int8)
    return codes


def _grids(
    blocks: np.ndarray, scheme: Scheme, importance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points) of each block (`blocks`: `[B, S, N]`, a block of S values per
    column), the range clipped by the factor of `CLIP_GRID` that minimizes the block's
    squared rounding error, each value weighted by `importance` (`[B, S]`, or None: equal)
    (case 4c)."""
    lo0 = np.minimum(blocks.min(axis=1), 0.0)
    hi0 = np.maximum(blocks.max(axis=1), 0.0)
    weight = np.ones(blocks.shape[:2]) if importance is None else importance

    def error(scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        q = np.clip(
            np.rint(blocks / scale[:, None, :]) + zero[:, None, :], scheme.qmin, scheme.qmax
        )
        deq = (q - zero[:, None, :]) * scale[:, None, :]
        return np.einsum("bs,bsn->bn", weight, (blocks - deq) ** 2)

    best_scale, best_zero = _grid(lo0, hi0, scheme)
    best_err = error(best_scale, best_zero)
    for factor in CLIP_GRID[1:]:
        scale, zero = _grid(lo0 * factor, hi0 * factor, scheme)
        err = error(scale, zero)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


def _grid(lo: np.ndarray, hi: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points covering `[lo, hi]` (`Scheme.qparams`, vectorized), the scales
    rounded to float32."""
    if scheme.symmetric:
        scale = np.maximum(-lo, hi) / scheme.qmax
        zero = np.zeros_like(scale)
    else:
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
        zero = None
    scale = scale.astype(np.float32).astype(np.float64)
    scale[~(scale > 0)] = 1.0
    if zero is None:
        zero = np.clip(np.rint(scheme.qmin - lo / scale), scheme.qmin, scheme.qmax)
    return scale, zero


def quantize_rtn(
    weight: np.ndarray, axis: int, scheme: Scheme, importance: np.ndarray | None = None
) -> _Quantized:
    """Round to nearest (case 4a), blocks along `axis` (0 or 1 of a 2-D weight), each block's
    range clipped where that lowers its error (case 4c); `importance`: one weight per position
    along `axis` (a layer input's mean square), or None."""
    assert scheme.block_size is not None
    w = np.asarray(weight, np.float64)
    w = w if axis == 0 else w.T  # [K, N]: blocks along K
    k_dim, n_dim = w.shape
    size = scheme.block_size
    count = -(-k_dim // size)
    pad = count * size - k_dim
    padded = np.concatenate([w, np.repeat(w[-1:], pad, axis=0)]) if pad else w
    imp = np.ones(k_dim) if importance is None else np.asarray(importance, np.float64)
    imp = np.concatenate([imp, np.zeros(pad)])  # padding rows do not count
    blocks = padded.reshape(count, size, n_dim)
    scale, zero = _grids(blocks, scheme, imp.reshape(count, size))
    full_scale = np.repeat(scale, size, axis=0)[:k_dim]
    full_zero = np.repeat(zero, size, axis=0)[:k_dim]
    codes = np.clip(np.rint(w / full_scale) + full_zero, scheme.qmin, scheme.qmax)
    codes = codes.astype(scheme.numpy_dtype)
    zeros = None if scheme.symmetric else zero.astype(scheme.numpy_dtype)
    scales = scale.astype(np.float32)
    if axis == 1:
        return _Quantized(codes.T, scales.T, None if zeros is None else zeros.T)
    return _Quantized(codes, scales, zeros)


def quantize_gptq(
    weight: np.ndarray, hessian: np.ndarray, scheme: Scheme, damp: float | None = None
) -> _Quantized:
    """GPTQ (case 4b) of a `[K, N]` MatMul weight, blocks along K, given `H` (`[K, K]`)."""
    assert scheme.block_size is not None
    w = np.array(weight, dtype=np.float64)
    k_dim, n_dim = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    damp = GPTQ_DAMP if damp is None else damp
    h[np.diag_indices(k_dim)] += damp * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U, U upper triangular
    except np.linalg.LinAlgError:  # not positive definite even dampened: plain rounding
        logger.info("gptq: Hessian not positive definite; rounding to nearest")
        return quantize_rtn(weight, 0, scheme)
    size = scheme.block_size
    blocks = -(-k_dim // size)
    codes = np.zeros((k_dim, n_dim), scheme.numpy_dtype)
    scales = np.zeros((blocks, n_dim), np.float64)
    zeros = np.zeros((blocks, n_dim), np.float64)
    batch = max(size, GPTQ_BATCH // size * size)  # a whole number of blocks
    scale = zero = None
    for start in range(0, k_dim, batch):
        end = min(start + batch, k_dim)
        rows = w[start:end].copy()
        errors = np.zeros_like(rows)
        u = upper[start:end, start:end]
        for i in range(end - start):
            k = start + i
            if k % size == 0:  # a block starts: its grid from the rows as they are now
                block = rows[i : i + size]
                s, z = _grids(block[None], scheme, np.diag(h)[k : k + len(block)][None])
                scale, zero = s[0], z[0]
                scales[k // size], zeros[k // size] = scale, zero
            assert scale is not None and zero is not None
            q = np.clip(np.rint(rows[i] / scale) + zero, scheme.qmin, scheme.qmax)
            codes[k] = q
            err = (rows[i] - (q - zero) * scale) / u[i, i]
            rows[i:] -= np.outer(u[i, i:], err)
            errors[i] = err
        w[end:] -= upper[start:end, end:].T @ errors
    dtype = scheme.numpy_dtype
    return _Quantized(
        codes,
        scales.astype(np.float32),
        None if scheme.symmetric else zeros.astype(dtype),
    )


class _Int4Job(PlannedStage):
    """One run of the stage with the user's settings: plan, materialize, and the quantized
    weights each unit gets (computed once, reused by every candidate)."""

    name = "int4"
    precision = "int4"

    def __init__(
        self,
        settings: StageSettings,
        calibration: CalibrationSource,
    ) -> None:
        self.settings = settings
        self.calibration = calibration
        self.block_size = settings.block_size
        self.method = settings.int4_method
        self.scheme = int4_scheme(self.block_size, settings.symmetric)
        self.units: dict[str, _Unit] = {}
        self.quantized: dict[tuple[str, bool, bool, str | None], _Quantized] = {}
        #: the base name of each quantized weight's tensors, by key and by unit
        self.key_names: dict[tuple[str, bool, bool, str | None], str] = {}
        self.names: dict[str, str] = {}
        self.hessians: dict[str, np.ndarray] = {}
        self.fitted_on_budget_samples = False
        self.gptq_fitted = False
        self.qdq_base: onnx.ModelProto | None = None
        self.format = "contrib"

    # ---------------------------------------------------------------------------------------
    # Case 1: the plan

    def plan(self, model: onnx.ModelProto, profile: TargetProfile, exclude: Sequence[str]) -> Plan:
        self.format = profile.int4_format
        patterns = compile_excludes(exclude)
        inits = {t.name: t for t in model.graph.initializer}
        what = f"{self.scheme.describe()} ({self.method})"
        self.units, declined = collect_units(
            model, ("MatMul", "Gemm", "Gather"), lambda n: self._unit(n, inits), patterns
        )
        applied = dict.fromkeys(self.units, what)
        # a weight that some other node reads in float stays float: int4 beside it adds bytes
        readers = tensor_readers(model)
        for name in list(applied):
            others = [r for r in readers[self.units[name].weight] if r not in self.units]
            if others:
                del applied[name], self.units[name]
                declined[name] = (
                    f"weight also read in float by {others[0]!r} (int4 would add, not save)"
                )
        if not applied:
            shown = "; ".join(f"{n}: {r}" for n, r in list(declined.items())[:3])
            raise NothingToQuantize(
                "--quantize int4: no MatMul, Gemm or Gather with a 2-D float constant weight "
                "qualifies; nothing to quantize" + (f" ({shown})" if shown else "")
            )
        if self.method == "gptq" and applied:
            self._fit_gptq(model, [self.units[n] for n in applied])
        return Plan(self.name, profile.name, applied, declined)

    def _unit(
        self, node: onnx.NodeProto, inits: Mapping[str, TensorProto]
    ) -> tuple[_Unit | None, str | None]:
        tensor, reason = weight_initializer(node, inits)
        if tensor is None:
            return None, reason
        if tensor.data_type not in _FLOATS or len(tensor.dims) != 2:
            return None, "weight is not a 2-D float tensor"
        rows, cols = tensor.dims
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gather":
            if attrs.get("axis", 0) not in (0, -2):
                return None, "Gather along an axis other than 0"
            reduction = cols
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                return None, "Gemm with transA or alpha != 1"
            if len(node.input) > 2 and node.input[2]:
                bias = inits.get(node.input[2])
                n = rows if attrs.get("transB", 0) else cols
                if bias is None or list(bias.dims) != [n] or attrs.get("beta", 1.0) != 1.0:
                    return None, "Gemm bias is not a constant vector (or beta != 1)"
            reduction = cols if attrs.get("transB", 0) else rows
        else:
            reduction = rows
        if rows * cols < MIN_ELEMENTS:
            return None, f"weight of {rows * cols} values (under {MIN_ELEMENTS}: nothing to gain)"
        if reduction < self.block_size:
            return None, f"reduction axis of {reduction} is shorter than block {self.block_size}"
        activation = None if node.op_type == "Gather" else node.input[0]
        transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        return _Unit(node.name, node.op_type, tensor.name, activation, transposed, reduction), None

    def unit_sizes(self, model: onnx.ModelProto, plan: Plan) -> dict[str, int]:
        """Bytes each unit saves (case 5): its float weight's, less about an eighth."""
        inits = {t.name: t for t in model.graph.initializer}
        sizes = {}
        for name in plan.applied:
            tensor = inits[self.units[name].weight]
            count = int(np.prod(tensor.dims))
            sizes[name] = count * np.dtype(_FLOATS[tensor.data_type]).itemsize - count // 2
        return sizes

    # ---------------------------------------------------------------------------------------
    # Case 4b: Hessians of the layers' inputs

    def _fit_gptq(self, model: onnx.ModelProto, units: Sequence[_Unit]) -> None:
        """GPTQ every linear unit now (case 4b), in groups of layer inputs whose Hessians fit
        in `GPTQ_HESSIAN_BYTES`: one pass over the calibration data per group, its units
        quantized, its Hessians let go."""
        inits = {t.name: t for t in model.graph.initializer}
        sizes: dict[str, int] = {}
        for unit in units:
            if unit.activation is not None:
                sizes[unit.activation] = 8 * unit.reduction**2
        groups: list[list[str]] = []
        held = 0
        for name in sorted(sizes):
            if not groups or held + sizes[name] > GPTQ_HESSIAN_BYTES:
                groups.append([])
                held = 0
            groups[-1].append(name)
            held += sizes[name]
        for group in groups:
            members = [u for u in units if u.activation in group]
            self._collect_hessians(model, members)
            for unit in members:
                self._quantize(unit, inits[unit.weight], unit.transposed)
            self.hessians = {}
        self.gptq_fitted = bool(groups)
        if len(groups) > 1:
            logger.info("gptq: %d passes over the calibration data", len(groups))

    def _collect_hessians(self, model: onnx.ModelProto, units: Sequence[_Unit]) -> None:
        wanted = sorted({u.activation for u in units if u.activation is not None})
        if not wanted:
            return
        data = as_calibration_data(self.calibration, model, self.settings.calibration_batch)
        # The budget measures on the first DEFAULT_SAMPLES calibration samples: GPTQ fits on
        # the others when there are enough, so that the budget judges samples it did not fit.
        skip = DEFAULT_SAMPLES if data.samples > 2 * DEFAULT_SAMPLES else 0
        self.fitted_on_budget_samples = skip == 0
        inits = {t.name: t for t in model.graph.initializer}
        stats = input_statistics(
            model,
            data,
            dict.fromkeys(wanted, -1),
            gram=True,
            mask=mask_input(model, self.settings.mask_input),
            elem_types={u.activation: inits[u.weight].data_type for u in units if u.activation},
            skip_samples=skip,
            progress=self.settings.progress,
            phase="gptq statistics",
        )
        self.hessians = {name: s.xtx for name, s in stats.items() if s.xtx is not None}
        logger.info("gptq: Hessians of %d input(s)", len(self.hessians))

    # ---------------------------------------------------------------------------------------
    # Cases 2-4: a unit's weight in 4 bits, computed once

    def _quantize(
        self, unit: _Unit, tensor: TensorProto, transposed: bool
    ) -> tuple[_Quantized, tuple[int, ...]]:
        """The unit's weight in 4 bits and its shape, in the layout of case 3: `[K, N]` blocks
        along K for a MatMul/Gemm (a Gemm weight untransposed first), `[V, D]` blocks along D
        for a table. Read and quantized once per weight, layout and (gptq) input."""
        shape = tuple(reversed(tensor.dims)) if transposed else tuple(tensor.dims)
        fitted = unit.activation if self.method == "gptq" else None  # gptq: fit per input
        key = (unit.weight, unit.op == "Gather", transposed, fitted)
        if key not in self.quantized:
            # the new tensors' names: the weight's, or the node's too when another layout or
            # input of the same weight took them
            taken = any(k[0] == unit.weight for k in self.quantized)
            self.key_names[key] = f"{unit.weight}_{unit.node}" if taken else unit.weight
            weight = array_of(tensor)
            weight = weight.T if transposed else weight
            if unit.op == "Gather":
                self.quantized[key] = quantize_rtn(weight, 1, self.scheme)
            elif self.method == "gptq" and unit.activation in self.hessians:
                self.quantized[key] = quantize_gptq(
                    weight, self.hessians[unit.activation], self.scheme
                )
            else:
                h = self.hessians.get(unit.activation or "")
                importance = None if h is None else np.diag(h)
                self.quantized[key] = quantize_rtn(weight, 0, self.scheme, importance)
        self.names[unit.node] = self.key_names[key]
        return self.quantized[key], shape

    # ---------------------------------------------------------------------------------------
    # Case 3: materialization

    def materialize(self, model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, list[str]]:
        if not plan.applied:
            return model, []
        if self.format == "qdq":
            if self.qdq_base is None:
                self.qdq_base = _at_qdq_opset(model)
            source = self.qdq_base
        else:
            source = model
        work = onnx.ModelProto()
        work.CopyFrom(source)
        graph = work.graph
        inits = {t.name: t for t in graph.initializer}
        added: dict[str, None] = {}
        new_inits: list[TensorProto] = []
        replaced: set[str] = set()
        nodes: list[onnx.NodeProto] = []

        def add(tensor: TensorProto) -> str:
            if tensor.name not in added:
                added[tensor.name] = None
                new_inits.append(tensor)
            return tensor.name

        for node in graph.node:
            unit = self.units.get(node.name) if node.name in plan.applied else None
            if unit is None:
                nodes.append(node)
                continue
            tensor = inits[unit.weight]
            q, shape = self._quantize(unit, tensor, unit.transposed)
            replaced.add(unit.weight)
            if self.format == "contrib":
                nodes.append(self._contrib_node(node, unit, shape, q, tensor.data_type, add))
            else:
                nodes.extend(self._qdq_nodes(node, unit, shape, q, tensor.data_type, add))
        del graph.node[:]
        graph.node.extend(nodes)
        read = {i for g_node in graph.node for i in g_node.input}
        read |= {o.name for o in graph.output}
        drop_initializers(graph, replaced - read)
        graph.initializer.extend(new_inits)
        if self.format == "contrib" and not any(o.domain == _MS_DOMAIN for o in work.opset_import):
            work.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
        counts = {"MatMul": 0, "Gemm": 0, "Gather": 0}
        for name in plan.applied:
            counts[self.units[name].op] += 1
        notes = [
            f"int4: {counts['MatMul'] + counts['Gemm']} MatMul/Gemm weight(s) and "
            f"{counts['Gather']} Gather table(s) in 4 bits, block {self.block_size}, "
            f"{'symmetric' if self.scheme.symmetric else 'asymmetric'}, {self.method}, as "
            + (
                "MatMulNBits/GatherBlockQuantized (com.microsoft)"
                if self.format == "contrib"
                else f"opset-{QDQ_OPSET} blocked DequantizeLinear"
            )
        ]
        if self.gptq_fitted and self.fitted_on_budget_samples:
            notes.append(
                f"gptq fitted the weights on the samples the error budget is measured on (give "
                f"more than {2 * DEFAULT_SAMPLES} calibration samples to keep them apart): the "
                "budget's figure is optimistic; the held-out check is the one to read"
            )
        return work, notes

    def _contrib_node(
        self,
        node: onnx.NodeProto,
        unit: _Unit,
        shape: tuple[int, ...],
        q: _Quantized,
        float_type: int,
        add,
    ) -> onnx.NodeProto:
        """MatMulNBits or GatherBlockQuantized in the node's place (case 3a)."""
        np_float = _FLOATS[float_type]
        base = self.names[unit.node]
        symmetric = self.scheme.symmetric
        if unit.op == "Gather":
            table, *rest = self._q4_inputs(base, q, float_type, add)
            return helper.make_node(
                "GatherBlockQuantized",
                [table, node.input[1], *rest],
                list(node.output),
                name=node.name,
                domain=_MS_DOMAIN,
                gather_axis=0,
                quantize_axis=1,
                block_size=self.block_size,
            )
        k_dim, n_dim = shape
        size = self.block_size
        blocks = -(-k_dim // size)
        codes = q.codes.astype(np.int16) + (8 if symmetric else 0)  # uint4 codes (case 3a)
        padded = np.full((blocks * size, n_dim), 8, np.int16)  # 8: symmetric zero
        padded[:k_dim] = codes
        if q.zeros is not None:  # padding rows dequantize to 0 with their block's zero point
            padded[k_dim:] = np.repeat(q.zeros.astype(np.int16), size, axis=0)[
                k_dim : blocks * size
            ]
        b = pack_nibbles(padded.T.reshape(n_dim, blocks, size))  # [N, blocks, size / 2]
        inputs = [
            node.input[0],
            add(onnx.numpy_helper.from_array(b, f"{base}_nbits")),
            add(_array(f"{base}_nbits_scales", q.scales.T, np_float)),  # [N, blocks]
        ]
        if q.zeros is not None:
            zp = pack_nibbles(q.zeros.T)  # [N, ceil(blocks / 2)]
            inputs.append(add(onnx.numpy_helper.from_array(zp, f"{base}_nbits_zero_points")))
        if unit.op == "Gemm" and len(node.input) > 2 and node.input[2]:
            inputs += [""] * (5 - len(inputs)) + [node.input[2]]  # bias is input 5
        attrs: dict[str, Any] = {"K": k_dim, "N": n_dim, "bits": 4, "block_size": size}
        if self.settings.accuracy_level:
            attrs["accuracy_level"] = self.settings.accuracy_level
        return helper.make_node(
            "MatMulNBits", inputs, list(node.output), name=node.name, domain=_MS_DOMAIN, **attrs
        )

    def _q4_inputs(self, base: str, q: _Quantized, float_type: int, add) -> list[str]:
        """The 4-bit codes, scales and (asymmetric) zero points of a weight in the ONNX layout
        that GatherBlockQuantized and blocked DequantizeLinear share (case 3), added."""
        int_type = TensorProto.INT4 if self.scheme.symmetric else TensorProto.UINT4
        names = [
            add(_packed_tensor(f"{base}_q4", q.codes, int_type)),
            add(_array(f"{base}_q4_scales", q.scales, _FLOATS[float_type])),
        ]
        if q.zeros is not None:
            names.append(add(_packed_tensor(f"{base}_q4_zero_points", q.zeros, int_type)))
        return names

    def _qdq_nodes(
        self,
        node: onnx.NodeProto,
        unit: _Unit,
        shape: tuple[int, ...],
        q: _Quantized,
        float_type: int,
        add,
    ) -> list[onnx.NodeProto]:
        """An opset-21 blocked DequantizeLinear feeding the unchanged node (case 3b)."""
        base = self.names[unit.node]
        inputs = self._q4_inputs(base, q, float_type, add)
        out = f"{base}_dequantized_{node.name}"
        dq = helper.make_node(
            "DequantizeLinear",
            inputs,
            [out],
            name=f"{node.name}_int4_DequantizeLinear",
            axis=1 if unit.op == "Gather" else 0,
            block_size=self.block_size,
        )
        rewired = onnx.NodeProto()
        rewired.CopyFrom(node)
        rewired.input[0 if unit.op == "Gather" else 1] = out
        if unit.op == "Gemm":
            for attr in rewired.attribute:
                if attr.name == "transB":
                    attr.i = 0  # the dequantized weight is [K, N]
        return [dq, rewired]


def _at_qdq_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` at opset `QDQ_OPSET` (case 3b); one line when the converter cannot raise it."""
    if default_opset(model) >= QDQ_OPSET:
        return model
    try:
        return convert_opset(model, QDQ_OPSET)
    except UsageError as exc:
        raise UsageError(
            f"--quantize int4 --target tensorrt needs opset {QDQ_OPSET} (blocked "
            f"DequantizeLinear): {exc}"
        ) from None


def _array(name: str, values: np.ndarray, dtype: type) -> TensorProto:
    return onnx.numpy_helper.from_array(np.ascontiguousarray(values, dtype=dtype), name)


def _packed_tensor(name: str, codes: np.ndarray, data_type: int) -> TensorProto:
    """A 4-bit tensor (INT4/UINT4) of `codes`' shape, packed as ONNX stores them: the flat
    values two to a byte, the first in the low nibble."""
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(codes.shape)
    tensor.raw_data = pack_nibbles(np.asarray(codes).reshape(-1)).tobytes()
    return tensor


class Int4Stage:
    """`--quantize int4` as a lossy stage (module docstring): each run is an `_Int4Job`, a
    `PlannedStage` holding the run's settings and quantized weights."""

    name = "int4"
    summary = (
        "block-wise 4-bit weights for MatMul/Gemm layers and Gather (embedding) tables, "
        "round-to-nearest or GPTQ, sensitive layers kept float by the error budget"
    )

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
        settings: StageSettings,
    ) -> StageResult:
        self.check(settings)
        return _Int4Job(settings, calibration).run(model, calibration, settings)

    @staticmethod
    def check(settings: StageSettings) -> None:
        """UsageError (one line) for a block size, method or accuracy level it does not take."""
        _check_settings(settings)


def _check_settings(settings: StageSettings) -> None:
    if settings.block_size not in BLOCK_SIZES:
        raise UsageError(
            f"--block-size {settings.block_size}: expected one of "
            f"{', '.join(map(str, BLOCK_SIZES))} (ONNX Runtime's int4 kernels take powers of "
            "two from 16)"
        )
    if settings.int4_method not in METHODS:
        raise UsageError(
            f"--int4-method {settings.int4_method!r}: expected one of {', '.join(METHODS)}"
        )
    if settings.accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(f"--accuracy-level {settings.accuracy_level}: expected 0 to 4")


STAGE = Int4Stage()

__all__ = [
    "BLOCK_SIZES",
    "METHODS",
    "NothingToQuantize",
    "STAGE",
    "int4_scheme",
    "pack_nibbles",
    "quantize_gptq",
    "quantize_rtn",
    "unpack_nibbles",
]
