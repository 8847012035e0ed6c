"""`--quantize int8+int4`: 4-bit weights for the large linear layers and tables, static int8
for the rest where it is faster.

1. The int4 stage (`onnxshrink.rules.int4`) runs first, within half of `--max-error`: its
   MatMul/Gemm weights and Gather tables become MatMulNBits/GatherBlockQuantized (or blocked
   DequantizeLinear for tensorrt). A model without such a layer (a CNN) skips it with a note,
   and the int8 stage then has the whole budget.
2. The int8 stage (`onnxshrink.rules.int8`) runs on that result, within the other half: its
   Conv/Gemm/MatMul layers that are still float (those int4 declined, convolutions) get QDQ
   int8, and its speed check keeps int8 compute only where it is faster than float compute
   (ort-cpu). int4 layers are contrib ops or already dequantized weights: int8 leaves them.
   Its error is measured against the int4 model it starts from.
3. The result's error against the float model is then measured on the calibration samples
   (the budget's figure, one more session): the two halves add up to at most about the budget,
   and this says what they came to. The held-out check judges it against the original, as for
   any stage. Steps 1-3 are the engine's `ChainedStage` with half of the budget each.
"""

from __future__ import annotations

import dataclasses

import onnx

from onnxshrink.quant.lossy import (
    CalibrationSource,
    ChainedStage,
    StageResult,
    StageSettings,
    as_calibration_data,
)
from onnxshrink.rules import int4, int8


class Int8Int4Stage:
    """`--quantize int8+int4` (module docstring): the int4 stage, then the int8 stage, each
    within half of the budget (`ChainedStage`)."""

    name = "int8+int4"
    summary = (
        "int4 weights for MatMul/Gemm layers and Gather tables, then static int8 for the "
        "remaining layers where it is faster, each within half of the error budget"
    )

    @staticmethod
    def check(settings: StageSettings) -> None:
        int4.STAGE.check(settings)

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
        settings: StageSettings,
    ) -> StageResult:
        data = as_calibration_data(calibration, model, settings.calibration_batch)
        half = settings.max_error / 2
        try:
            result = ChainedStage(int4.STAGE, int8.STAGE, half, half).run(model, data, settings)
        except int4.NothingToQuantize as exc:  # case 1: int8 gets the whole budget
            result = int8.STAGE.run(model, data, settings)
            result.notes.insert(0, f"int4 skipped: {exc}")
        return dataclasses.replace(result, stage=self.name)


STAGE = Int8Int4Stage()
