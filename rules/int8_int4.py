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
   any stage.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxshrink.quant.calibration import CalibrationData
from onnxshrink.quant.lossy import StageResult, StageSettings, as_calibration_data
from onnxshrink.quant.sensitivity import DEFAULT_SAMPLES, ErrorReference
from onnxshrink.rules import int4, int8
from onnxshrink.verify.measure import mask_input


class Int8Int4Stage:
    """`--quantize int8+int4` (module docstring): the int4 stage, then the int8 stage."""

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
        calibration: str | Path | CalibrationData | Iterable[Mapping[str, np.ndarray]],
        settings: StageSettings,
    ) -> StageResult:
        data = as_calibration_data(calibration, model, settings.calibration_batch)
        half = dataclasses.replace(settings, max_error=settings.max_error / 2)
        notes: list[str] = []
        try:
            first: StageResult | None = int4.STAGE.run(model, data, half)
        except int4.NothingToQuantize as exc:  # case 1: int8 gets the whole budget
            first = None
            notes.append(f"int4 skipped: {exc}")
        base = model if first is None else first.model
        second = int8.STAGE.run(base, data, settings if first is None else half)
        start = time.perf_counter()
        reference = ErrorReference.from_model(model, data, DEFAULT_SAMPLES)  # case 3
        reference.mask = mask_input(model, settings.mask_input)
        error = reference.error(second.model, "the int8+int4 model")
        budget = dataclasses.replace(
            second.budget,
            max_error=settings.max_error,
            full_error=error,
            final_error=error,
            sessions=second.budget.sessions + (first.budget.sessions if first else 0) + 1,
        )
        int4_layers = [] if first is None else [u for u in first.layers if u.precision == "int4"]
        taken = {u.name for u in int4_layers}
        layers = int4_layers + [u for u in second.layers if u.name not in taken]
        if first is not None:
            notes.extend(first.notes)
            notes.append(
                f"error against the float model (calibration samples): int4 stage "
                f"{first.budget.final_error:.3g}, int8 stage on top of it "
                f"{second.budget.final_error:.3g}, both {error:.3g} (budget "
                f"{settings.max_error:g}, half to each stage)"
            )
        timings = dict(first.timings) if first is not None else {}
        timings.update((f"int8 {k}", v) for k, v in second.timings.items())
        timings["final error"] = time.perf_counter() - start
        return dataclasses.replace(
            second,
            stage=self.name,
            budget=budget,
            layers=layers,
            notes=notes + second.notes,
            timings=timings,
        )


STAGE = Int8Int4Stage()
