"""Quantization schemes (onnxshrink.quant.schemes): ranges to qparams, values to integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.errors import UsageError
from onnxshrink.quant.schemes import INT8_ACTIVATION, INT8_WEIGHT, UINT8_ACTIVATION, Scheme


def test_integer_ranges_and_types() -> None:
    assert (INT8_WEIGHT.qmin, INT8_WEIGHT.qmax) == (-127, 127)  # restricted, symmetric
    assert (UINT8_ACTIVATION.qmin, UINT8_ACTIVATION.qmax) == (0, 255)
    int4 = Scheme(4, granularity="block", block_size=32)
    assert (int4.qmin, int4.qmax) == (-8, 7)
    assert int4.onnx_dtype == onnx.TensorProto.INT4 and int4.numpy_dtype == np.int8
    assert Scheme(4, signed=False).qmax == 15
    assert int4.describe() == "int4 block 32 symmetric"
    for bad in (
        dict(bits=3),
        dict(granularity="row"),
        dict(granularity="block"),
        dict(block_size=16),
        dict(scale_dtype="bfloat16"),
    ):
        with pytest.raises(UsageError):
            Scheme(**bad)


def test_qparams_from_ranges() -> None:
    scale, zero = UINT8_ACTIVATION.qparams(-1.3, 4.7)
    assert scale == pytest.approx(6.0 / 255) and zero == 55
    scale, zero = INT8_ACTIVATION.qparams(-1.3, 4.7)
    assert scale == pytest.approx(4.7 / 127) and zero == 0
    assert UINT8_ACTIVATION.qparams(0.0, 0.0) == (1.0, 0)
    assert Scheme(8, signed=False, symmetric=True).qparams(-2.0, 1.0)[1] == 128
    half = Scheme(8, scale_dtype="float16")
    scale, _ = half.qparams(-1.0, 1.0)
    assert scale == float(np.float16(1 / 127))


def test_per_channel_weights_round_trip() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (16, 8, 3, 3)).astype(np.float32)
    w[3] = 0.0  # an all-zero channel gets scale 1
    q, scales, zeros = INT8_WEIGHT.quantize_array(w, axis=0)
    assert q.dtype == np.int8 and scales.shape == (16,) and zeros is None
    assert scales[3] == 1.0 and np.abs(q).max() <= 127
    np.testing.assert_allclose(scales[0], np.abs(w[0]).max() / 127, rtol=1e-6)
    back = INT8_WEIGHT.dequantize_array(q, scales, axis=0)
    assert np.all(np.abs(back - w) <= scales.reshape(-1, 1, 1, 1) / 2 + 1e-7)
    floor = np.full(16, 0.5, np.float32)
    _, floored, _ = INT8_WEIGHT.quantize_array(w, axis=0, floor=floor)
    assert np.all(floored >= 0.5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_wise_int4_along_the_reduction_axis(symmetric: bool) -> None:
    """MatMul weight [K, N] in blocks of 32 along K (axis 0), K not a multiple of 32."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (72, 5)).astype(np.float32)
    w[40:64, 2] *= 50  # one block with a large range: only its own scale grows
    scheme = Scheme(4, granularity="block", block_size=32, symmetric=symmetric)
    q, scales, zeros = scheme.quantize_array(w, axis=0)
    assert scales.shape == (3, 5) and q.shape == w.shape
    assert (zeros is None) == symmetric
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax
    assert scales[1, 2] > 10 * scales[0, 2] and scales[0, 2] < 2 * scales[0, 1]
    back = scheme.dequantize_array(q, scales, zeros, axis=0)
    step = np.repeat(scales, 32, axis=0)[:72]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


def test_per_tensor_and_missing_axis() -> None:
    w = np.array([[-2.0, 1.0], [0.5, 4.0]], np.float32)
    q, scale, _ = Scheme(8, symmetric=True, restricted=True).quantize_array(w)
    assert scale.shape == () and float(scale) == pytest.approx(4.0 / 127)
    with pytest.raises(UsageError, match="needs an axis"):
        INT8_WEIGHT.quantize_array(w)
