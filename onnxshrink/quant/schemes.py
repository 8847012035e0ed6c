"""Quantization schemes: how one tensor maps to integers, as data rather than code paths.

A `Scheme` says how many bits, signed or not, the granularity (one scale per tensor, per
channel along an axis, or per block of `block_size` elements along an axis), symmetric or not,
and the dtype its scales are stored in. 8-bit per-channel weights, uint8 per-tensor
activations and 4-bit block-wise weights are three values of this one type.

Algebra. Quantize `q = clamp(round(x / s) + z, qmin, qmax)`, dequantize `x' = (q - z) s`.

1. Integer range. Signed b bits: `[-2^(b-1), 2^(b-1) - 1]`; a `restricted` symmetric scheme
   drops the lowest code, `[-(2^(b-1) - 1), 2^(b-1) - 1]` (what TensorRT's int8 and ORT's
   per-channel weights use, so that the grid is symmetric about 0). Unsigned: `[0, 2^b - 1]`.
2. From a range `(lo, hi)` (`qparams`, the one place ranges become scales and zero points;
   observers' `qparams` call it). The range is widened to hold 0, so that zero (padding, ReLU)
   is exact.
   a. Symmetric, signed: `t = max(-lo, hi)`, `s = t / qmax`, `z = 0`.
   b. Symmetric, unsigned: `s = 2 t / (qmax - qmin)`, `z` the middle code (128 for uint8).
   c. Asymmetric: `s = (hi - lo) / (qmax - qmin)`, `z = clamp(round(qmin - lo / s))`.
   A range of width 0 gets `s = 1`. Scales are rounded to the scale dtype.
3. From values (`quantize_array`, for weights): the range of each group (the whole tensor, a
   channel, or a block) is taken from the values themselves, then 2 applies per group. Blocks
   run along `axis` (the reduction axis of a MatMul weight `[K, N]` is 0); a last, shorter
   block is padded for the statistics only. `floor` (one value per group) raises scales below
   it: int8 case 3 of `onnxshrink.rules.qdq` uses it to keep an int32 bias in range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxshrink.errors import UsageError

GRANULARITIES = ("tensor", "channel", "block")
_SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class Scheme:
    """How a tensor is quantized (module docstring)."""

    bits: int = 8
    signed: bool = True
    granularity: str = "tensor"
    symmetric: bool = True
    block_size: int | None = None
    scale_dtype: str = "float32"
    restricted: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"quantization scheme: {self.bits} bits; expected 4 or 8")
        if self.granularity not in GRANULARITIES:
            raise UsageError(f"quantization scheme: granularity {self.granularity!r}")
        if (self.granularity == "block") != (self.block_size is not None):
            raise UsageError("quantization scheme: a block size goes with block granularity")
        if self.block_size is not None and self.block_size < 1:
            raise UsageError(f"quantization scheme: block size {self.block_size}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise UsageError(f"quantization scheme: scale dtype {self.scale_dtype!r}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        low = -(1 << (self.bits - 1))
        return low + 1 if self.restricted and self.symmetric else low

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy type the integers are held in (int4 values live in int8/uint8)."""
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def onnx_dtype(self) -> int:
        if self.bits == 8:
            return onnx.TensorProto.INT8 if self.signed else onnx.TensorProto.UINT8
        return onnx.TensorProto.INT4 if self.signed else onnx.TensorProto.UINT4

    def describe(self) -> str:
        """e.g. "int8 per-channel symmetric", "uint4 block 32 asymmetric"."""
        kind = f"{'int' if self.signed else 'uint'}{self.bits}"
        grain = {"tensor": "per-tensor", "channel": "per-channel"}.get(
            self.granularity, f"block {self.block_size}"
        )
        return f"{kind} {grain} {'symmetric' if self.symmetric else 'asymmetric'}"

    # ----------------------------------------------------------------------------------------
    # Case 2: a range to (scale, zero point)

    def qparams(self, lo: float, hi: float) -> tuple[float, int]:
        """(scale, zero_point) covering `[lo, hi]`, widened to hold 0 (module docstring, 2)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if self.symmetric:
            t = max(-lo, hi)
            if self.signed:
                return self._scale(t / self.qmax), 0
            return self._scale(2.0 * t / (self.qmax - self.qmin)), (self.qmax + 1) // 2
        scale = self._scale((hi - lo) / (self.qmax - self.qmin))
        zero_point = int(np.clip(round(self.qmin - lo / scale), self.qmin, self.qmax))
        return scale, zero_point

    def _scale(self, value: float) -> float:
        scale = float(_SCALE_DTYPES[self.scale_dtype](value))
        if not scale > 0.0 or not math.isfinite(scale):  # an all-zero range
            return 1.0
        return scale

    # ----------------------------------------------------------------------------------------
    # Case 3: values to integers, group by group

    def quantize_array(
        self, values: np.ndarray, axis: int | None = None, floor: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(integers, scales, zero points or None when symmetric) of `values` (docstring, 3).

        Per tensor: scales of shape `()`. Per channel along `axis`: one per channel, shape
        `[C]`. Per block along `axis`: shape of `values` with `axis` reduced to the number of
        blocks (what ONNX's blocked DequantizeLinear takes).
        """
        w = np.asarray(values, dtype=np.float32)
        if self.granularity == "tensor":
            groups = w.reshape(1, -1)
        else:
            if axis is None:
                raise UsageError(f"{self.describe()}: needs an axis")
            axis = axis % w.ndim
            moved = np.moveaxis(w, axis, 0)
            if self.granularity == "channel":
                groups = moved.reshape(moved.shape[0], -1)
            else:
                assert self.block_size is not None
                size = self.block_size
                count = -(-moved.shape[0] // size)
                padded = np.concatenate(
                    [moved, np.repeat(moved[-1:], count * size - moved.shape[0], axis=0)]
                )  # the last block padded with its own values: its range is unchanged
                blocks = padded.reshape(count, size, -1)  # [blocks, size, rest]
                groups = np.swapaxes(blocks, 1, 2).reshape(-1, size)  # [blocks * rest, size]
        lo = np.minimum(groups.min(axis=1), 0.0).astype(np.float64)
        hi = np.maximum(groups.max(axis=1), 0.0).astype(np.float64)
        dtype = _SCALE_DTYPES[self.scale_dtype]
        if self.symmetric:
            t = np.maximum(-lo, hi)
            if self.signed:
                scale = t / self.qmax
                zero = np.zeros_like(scale)
            else:
                scale = 2.0 * t / (self.qmax - self.qmin)
                zero = np.full_like(scale, (self.qmax + 1) // 2)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
            zero = None
        scale = scale.astype(dtype).astype(np.float64)
        scale[~(scale > 0)] = 1.0  # an all-zero group: any scale represents it exactly
        if floor is not None:
            scale = np.maximum(scale, np.asarray(floor, dtype=np.float64).reshape(-1))
            scale = scale.astype(dtype).astype(np.float64)
        if zero is None:
            zero = np.clip(np.rint(self.qmin - lo / scale), self.qmin, self.qmax)
        shape = self._group_shape(w.shape, axis)
        scale_full = self._expand(scale, w.shape, axis)
        zero_full = self._expand(zero, w.shape, axis)
        q = np.clip(np.rint(w / scale_full) + zero_full, self.qmin, self.qmax)
        q = q.astype(self.numpy_dtype)
        scales = self._shaped(scale.astype(dtype), shape, axis)
        zeros = None if self.symmetric else self._shaped(zero.astype(self.numpy_dtype), shape, axis)
        return q, scales, zeros

    def dequantize_array(
        self,
        q: np.ndarray,
        scales: np.ndarray,
        zeros: np.ndarray | None = None,
        axis: int | None = None,
    ) -> np.ndarray:
        """`(q - z) s`, the scales (and zero points) broadcast back over their groups."""
        shape = np.shape(q)
        axis = None if axis is None else axis % len(shape)
        s = self._expand(self._flat(np.asarray(scales, np.float64), axis), shape, axis)
        z = 0.0 if zeros is None else self._expand(self._flat(np.asarray(zeros), axis), shape, axis)
        return ((q.astype(np.float64) - z) * s).astype(np.float32)

    def _shaped(self, flat: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
        """Per-group values in `quantize_array`'s group order (blocks outermost) laid out as
        ONNX takes them: `shape`, the block index along `axis`."""
        if self.granularity != "block" or axis is None:
            return flat.reshape(shape)
        moved = (shape[axis], *[d for i, d in enumerate(shape) if i != axis])
        return np.moveaxis(flat.reshape(moved), 0, axis)

    def _flat(self, values: np.ndarray, axis: int | None) -> np.ndarray:
        """`_shaped` undone: per-group values back in group order, flat."""
        if self.granularity != "block" or axis is None or values.ndim == 0:
            return values.reshape(-1)
        return np.moveaxis(values, axis, 0).reshape(-1)

    def _group_shape(self, shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
        if self.granularity == "tensor" or axis is None:
            return ()
        if self.granularity == "channel":
            return (shape[axis],)
        assert self.block_size is not None
        out = list(shape)
        out[axis] = -(-shape[axis] // self.block_size)
        return tuple(out)

    def _expand(self, per_group: np.ndarray, shape: tuple[int, ...], axis: int | None) -> Any:
        """A per-group array (flat, in `quantize_array`'s group order) broadcast to `shape`."""
        if self.granularity == "tensor" or axis is None:
            return per_group.reshape(())
        if self.granularity == "channel":
            view = [1] * len(shape)
            view[axis] = shape[axis]
            return per_group.reshape(view)
        assert self.block_size is not None
        size = self.block_size
        count = -(-shape[axis] // size)
        rest = [d for i, d in enumerate(shape) if i != axis]
        blocks = per_group.reshape(count, *rest)  # [blocks, rest...]
        full = np.repeat(blocks, size, axis=0)[: shape[axis]]  # [K, rest...]
        return np.moveaxis(full, 0, axis)


#: the int8 schemes of the static int8 stage (onnxshrink.rules.qdq)
INT8_WEIGHT = Scheme(8, signed=True, granularity="channel", symmetric=True, restricted=True)
UINT8_ACTIVATION = Scheme(8, signed=False, granularity="tensor", symmetric=False)
INT8_ACTIVATION = Scheme(8, signed=True, granularity="tensor", symmetric=True, restricted=True)
