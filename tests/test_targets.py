"""Target profiles (onnxshrink.quant.targets): one place for what each runtime takes."""

from __future__ import annotations

import pytest

from onnxshrink.errors import UsageError
from onnxshrink.quant.targets import PROFILES, TARGETS, target_profile


def test_profiles_hold_the_runtime_rules() -> None:
    cpu, cuda, trt = (target_profile(n) for n in ("ort-cpu", "ort-cuda", "tensorrt"))
    assert TARGETS == ("ort-cpu", "ort-cuda", "tensorrt")
    assert not cpu.activation.signed and not cpu.activation.symmetric  # uint8 asymmetric
    assert trt.activation.signed and trt.activation.symmetric and trt.symmetric_activations
    assert cpu.weight.granularity == "channel" and cpu.weight.qmin == -127
    assert "MatMul" not in cpu.output_qdq_ops and "Conv" in cpu.output_qdq_ops
    assert cpu.static_matmul_output_qdq and not trt.static_matmul_output_qdq
    assert trt.residual_joins and not cpu.residual_joins and not trt.weight_only
    assert not cuda.int8_compute and cuda.float_compute_reason
    assert cpu.speed_check and not trt.speed_check
    assert target_profile(cpu) is cpu and PROFILES["ort-cpu"] is cpu
    with pytest.raises(UsageError, match="expected one of ort-cpu, ort-cuda, tensorrt"):
        target_profile("gpu")
