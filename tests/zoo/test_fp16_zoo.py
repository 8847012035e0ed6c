"""`optimize --quantize fp16` on the zoo: within its budget on held-out data, on ORT CPU."""

from __future__ import annotations

import onnx
import pytest

from models import data
from onnxshrink import optimize
from onnxshrink.quant.sensitivity import DEFAULT_MAX_ERROR
from tests.zoo.conftest import model_path

pytestmark = pytest.mark.zoo

# name -> (input shape pinned for the lossless stage, calibration feeds, held-out feeds)
CASES = {
    "ppocr-v4-det": ({"x": [1, 3, 640, 640]}, 4, 4),
    "ppocr-v5-rec": ({"x": [1, 3, 48, 320]}, 16, 16),
    "ppocr-v4-cls": ({"x": [1, 3, 48, 192]}, 16, 16),
    "minilm-l6": (None, 8, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp16_passes_its_budget_on_held_out_data(name):
    shapes, n_calib, n_eval = CASES[name]
    source = model_path(name)
    result = optimize(
        source,
        None,
        input_shapes=shapes,
        quantize="fp16",
        calibration_data=data.feeds_for(name, "calib", n_calib),
        inputs=data.feeds_for(name, "eval", n_eval),
    )
    stage = result.quantization
    assert stage is not None and stage.stage == "fp16" and stage.budget.within_budget
    check = result.quantized_parity
    assert check is not None and check.verified and check.held_out
    assert check.error <= DEFAULT_MAX_ERROR, check.outputs
    assert len(stage.quantized) > 0.5 * len(stage.layers)  # most nodes run in float16
    floats = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert floats and result.after.bytes < 0.6 * result.before.bytes
    # the interface stays float32
    assert [i.type.tensor_type.elem_type for i in result.model.graph.output] == [
        i.type.tensor_type.elem_type for i in onnx.load(str(source)).graph.output
    ]
