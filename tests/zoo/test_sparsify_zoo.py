"""`optimize --sparsify` on zoo models (issue 11): 2:4 on every pruned weight of MiniLM,
channels on PP-OCRv4 cls and on MiniLM's heads and FFN neurons.

The full figures (speed, IoU, more data) come from `bench/prune_ppocr.py`,
`bench/prune_minilm.py` and `bench/sparsify_minilm.py`; these check the same properties on
less data.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import data
from onnxshrink import optimize
from onnxshrink.engine.io import array_of
from onnxshrink.rules.prune_magnitude import follows_nm
from tests.zoo.conftest import model_path

pytestmark = pytest.mark.zoo


def _embeddings(model: onnx.ModelProto, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [data.sentence_embeddings(session.run(None, f)[0], f["attention_mask"]) for f in feeds]
    )


def test_two_four_on_minilm_follows_the_pattern_on_every_pruned_weight():
    source = model_path("minilm-l6")
    held_out = data.minilm_feeds("eval", n=4, batch=8)
    result = optimize(
        source, None, sparsify="2:4", calibration_data=data.minilm_feeds("calib", n=8, batch=8),
        inputs=held_out, max_error=10.0,
    )  # fmt: skip
    stage = result.quantization
    assert stage is not None and stage.plan is not None and stage.plan.applied
    inits = {t.name: t for t in result.model.graph.initializer}
    nodes = {n.name: n for n in result.model.graph.node}
    for unit in stage.plan.applied:  # MatMul [K, N]: groups of 4 along K (axis 0)
        node = nodes[unit]
        assert node.op_type == "MatMul"
        weight = array_of(inits[node.input[1]])
        assert follows_nm(weight, 2, 4, axis=0), unit
        assert np.mean(weight == 0) >= 0.5
    assert stage.budget.within_budget
    check = result.quantized_parity  # the parity figures the report gives
    assert check is not None and check.verified and check.held_out
    assert 0.0 < check.outputs[0].cosine <= 1.0 and np.isfinite(check.outputs[0].nsr)


def test_channels_on_ppocr_cls_keeps_its_answers():
    source = model_path("ppocr-v4-cls")
    calib, _ = data.cls_lines("ppocr-v4-cls", "calib", 96)
    held, _ = data.cls_lines("ppocr-v4-cls", "eval", 64)
    result = optimize(
        source, None, sparsify="channels:0.25", calibration_data=[{"x": calib}],
        inputs=[{"x": held}],
    )  # fmt: skip
    stage = result.quantization
    assert stage is not None and stage.quantized, "no channel group pruned"
    assert result.after.parameters < 0.9 * result.before.parameters
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    pruned = ort.InferenceSession(
        result.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    a = original.run(None, {"x": held})[0]
    b = pruned.run(None, {"x": held})[0]
    assert a.shape == b.shape
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9


def test_channels_on_minilm_prunes_heads_and_neurons_and_keeps_shapes():
    source = model_path("minilm-l6")
    held_out = data.minilm_feeds("eval", n=4, batch=8)
    result = optimize(
        source, None, sparsify="channels:0.3",
        calibration_data=data.minilm_feeds("calib", n=12, batch=8), inputs=held_out,
        max_error=10.0,
    )  # fmt: skip
    stage = result.quantization
    assert stage is not None
    from onnxshrink.rules.prune_channels import SECOND_HALF

    groups = {layer.name.removesuffix(SECOND_HALF) for layer in stage.quantized}
    assert len(groups) == 12  # 6 head groups, 6 FFN groups, each in its two halves
    assert len(stage.quantized) == 24 and stage.kept_float == []
    reference = _embeddings(onnx.load(str(source)), held_out)
    ours = _embeddings(result.model, held_out)
    assert ours.shape == reference.shape
    assert np.sum(reference * ours, axis=1).mean() > 0.85
    assert result.after.parameters < 0.9 * result.before.parameters
