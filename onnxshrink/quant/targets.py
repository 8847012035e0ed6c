"""Target profiles: what each runtime fuses, accepts and runs fast, held in one place.

A lossy stage asks its target profile instead of comparing target names: which schemes the
runtime's kernels take, where Q/DQ pairs must sit for its fusions, which layers it computes
faster in int8 than in float. Adding a runtime is adding a profile here.

1. `ort-cpu`: ONNX Runtime's CPU EP. uint8 asymmetric activations and int8 per-channel
   weights (its QLinearConv/QGemm/MatMulIntegerToFloat kernels, VNNI-friendly). Q/DQ also on
   the outputs of quantized Conv/ConvTranspose/Gemm (so that `DQ -> Conv -> Q` fuses into
   QLinearConv and the next layer reads int8), but not on MatMul outputs: ORT fuses a MatMul
   with a quantized input and a float output into MatMulIntegerToFloat, and an output Q there
   costs accuracy for no speed (measured on all-MiniLM-L6-v2: held-out embedding cosine
   0.9526 with output Q against 0.9935 without, latency 0.56x against 0.55x of fp32). The
   exception is a MatMul with a static input shape and a bias Add after it: ORT fuses that
   pair into a float Gemm first (MatMulAddFusion), so there the output Q/DQ stays and the
   layer is a QLinearMatMul (without it, PP-OCRv5's recognizer with pinned shapes ran its 9
   attention and MLP MatMuls in float on dequantized weights, slower than fp32's).
   Depthwise convolutions stay float (int8 kernels do not beat float ones there); a Conv
   stores int8 weights with float compute only when it holds at least 1% of the model's
   weights (a dequantized Conv weight loses ORT's NCHWc kernels). int8 compute is timed
   against float compute with int8 weights (the speed check), since small tensors gain
   nothing from int8 kernels.
2. `ort-cuda`: ONNX Runtime's CUDA EP has no int8 convolution or GEMM kernels for QDQ models:
   every layer computes in float, every weight that can be is stored int8 (a smaller file at
   float speed). fp16 is its compute precision of choice.
3. `tensorrt`: symmetric int8 activations and weights (TensorRT's Q/DQ rules), Q/DQ on layer
   inputs only (TensorRT propagates them), plus the residual input of an Add that joins a
   quantized layer and the input of pooling next to one; no weight-only storage (TensorRT
   expects Q/DQ on the activation as well). Depthwise convolutions stay float by this
   profile's choice, not a TensorRT limit (TensorRT has int8 depthwise kernels): with k*k
   multiply-adds per output they are memory-bound, so int8 gains little there; this has not
   been timed on TensorRT here. Each target's reason is its own (`depthwise_float_reason`),
   never another runtime's.
4-bit weights (`--quantize int4`, `int4_format`) are written as ONNX Runtime's MatMulNBits and
GatherBlockQuantized for both ORT targets, and as standard opset-21 blocked DequantizeLinear
for TensorRT (which stock ORT also runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxshrink.errors import UsageError
from onnxshrink.quant.schemes import INT8_ACTIVATION, INT8_WEIGHT, UINT8_ACTIVATION, Scheme


@dataclass(frozen=True)
class TargetProfile:
    """One runtime's rules for lossy stages (module docstring)."""

    name: str
    #: activation and weight schemes of int8 compute
    activation: Scheme
    weight: Scheme
    #: False: every layer computes in float, weights stored int8 (case 2)
    int8_compute: bool
    #: ops whose quantized output also gets Q/DQ, so the next layer reads int8 (case 1)
    output_qdq_ops: tuple[str, ...]
    #: Q/DQ on residual Add inputs and pooling inputs next to quantized layers (case 3)
    residual_joins: bool
    #: a MatMul with a static input shape and a bias Add after it gets output Q/DQ too (case 1)
    static_matmul_output_qdq: bool
    #: layers kept float store int8 weights by default (case 1, 2)
    weight_only: bool
    #: a Conv stores int8 weights only above this share of the model's weights (None: any)
    conv_weight_only_share: float | None
    #: why a depthwise Conv computes in float on this target (None: it computes in int8); the
    #: reason the report gives, so it names this target's own grounds
    depthwise_float_reason: str | None
    #: int8 compute is timed against float compute with int8 weights
    speed_check: bool
    #: why a layer computes in float on this target whatever its sensitivity (None: none)
    float_compute_reason: str | None = None
    #: how 4-bit weights are written (`onnxshrink.rules.int4`, 3): "contrib" (ONNX Runtime's
    #: MatMulNBits and GatherBlockQuantized) or "qdq" (opset-21 blocked DequantizeLinear)
    int4_format: str = "contrib"

    @property
    def symmetric_activations(self) -> bool:
        """Calibration collects |x| statistics for symmetric activation grids."""
        return self.activation.symmetric


PROFILES: dict[str, TargetProfile] = {
    "ort-cpu": TargetProfile(
        name="ort-cpu",
        activation=UINT8_ACTIVATION,
        weight=INT8_WEIGHT,
        int8_compute=True,
        output_qdq_ops=("Conv", "ConvTranspose", "Gemm"),
        static_matmul_output_qdq=True,
        residual_joins=False,
        weight_only=True,
        conv_weight_only_share=0.01,
        depthwise_float_reason=(
            "depthwise Conv (ort-cpu: ONNX Runtime's int8 depthwise kernels are not faster than "
            "its float ones)"
        ),
        speed_check=True,
    ),
    "ort-cuda": TargetProfile(
        name="ort-cuda",
        activation=UINT8_ACTIVATION,
        weight=INT8_WEIGHT,
        int8_compute=False,
        output_qdq_ops=(),
        static_matmul_output_qdq=False,
        residual_joins=False,
        weight_only=True,
        conv_weight_only_share=None,
        depthwise_float_reason="depthwise Conv (ort-cuda: no int8 conv kernels)",
        speed_check=False,
        float_compute_reason=(
            "float compute, weight stored int8 (ort-cuda: the CUDA EP has no int8 conv kernels)"
        ),
    ),
    "tensorrt": TargetProfile(
        name="tensorrt",
        activation=INT8_ACTIVATION,
        weight=INT8_WEIGHT,
        int8_compute=True,
        output_qdq_ops=(),
        static_matmul_output_qdq=False,
        residual_joins=True,
        weight_only=False,
        conv_weight_only_share=None,
        depthwise_float_reason=(
            "depthwise Conv (tensorrt profile: k*k multiply-adds per output, memory-bound, so "
            "little for int8 to gain; TensorRT runs it in float or fp16)"
        ),
        speed_check=False,
        int4_format="qdq",
    ),
}
TARGETS = tuple(PROFILES)


def target_profile(name: str | TargetProfile) -> TargetProfile:
    """The profile of a target name; UsageError (one line) for an unknown one."""
    if isinstance(name, TargetProfile):
        return name
    profile = PROFILES.get(name)
    if profile is None:
        raise UsageError(f"--target {name!r}: expected one of {', '.join(TARGETS)}")
    return profile
