"""`optimize --quantize int4` on all-MiniLM-L6-v2 (issue 10): held-out embeddings, file size.

The full figures (256 held-out sentences, ORT's quantizer side by side, latency) come from
`bench/int4_minilm.py`; this checks the same properties on fewer sentences.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models import data
from onnxshrink import optimize
from tests.zoo.conftest import model_path

pytestmark = pytest.mark.zoo


def _embeddings(model, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [data.sentence_embeddings(session.run(None, f)[0], f["attention_mask"]) for f in feeds]
    )


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_int4_gptq_shrinks_minilm_and_keeps_its_embeddings(target):
    source = model_path("minilm-l6")
    calib = data.minilm_feeds("calib", n=16, batch=8)
    held_out = data.minilm_feeds("eval", n=8, batch=8)
    result = optimize(
        source,
        None,
        quantize="int4",
        int4_method="gptq",
        target=target,
        calibration_data=calib,
        inputs=held_out,
        max_error=0.02,
    )
    stage = result.quantization
    assert stage is not None and stage.budget.within_budget
    ops = {n.op_type for n in result.model.graph.node}
    if target == "ort-cpu":
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    else:
        assert "DequantizeLinear" in ops and not ops & {"MatMulNBits", "GatherBlockQuantized"}
    assert result.after.bytes < 0.25 * result.before.bytes  # the table too (about half)
    import onnx

    reference = _embeddings(onnx.load(str(source)), held_out)
    ours = _embeddings(result.model, held_out)
    cosine = np.sum(reference * ours, axis=1)
    assert cosine.mean() >= 0.985, cosine
