"""Localization on a real model: one perturbed Conv weight is ranked first; an optimized
candidate (with partly different and reused tensor names) reports only tensors that match."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from models import data
from onnxshrink.cli import app
from onnxshrink.verify.localize import localize
from tests.zoo.conftest import model_path

pytestmark = pytest.mark.zoo

MODEL = "ppocr-v4-rec"


def _weighted_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Convs whose weight is a Constant node or an initializer, in graph order."""
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    constants |= {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in constants]


def perturb_conv(model: onnx.ModelProto, conv: onnx.NodeProto, factor: float = 1.01):
    """A copy of `model` with `conv`'s weight scaled by `factor` (wherever the weight lives)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = conv.input[1]
    for node in copy.graph.node:
        if node.op_type == "Constant" and node.output[0] == weight:
            attr = next(a for a in node.attribute if a.name == "value")
            values = onnx.numpy_helper.to_array(attr.t) * np.float32(factor)
            attr.t.CopyFrom(onnx.numpy_helper.from_array(values))
            return copy
    for tensor in copy.graph.initializer:
        if tensor.name == weight:
            values = onnx.numpy_helper.to_array(tensor) * np.float32(factor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, weight))
            return copy
    raise KeyError(weight)


@pytest.fixture(scope="module")
def reference() -> onnx.ModelProto:
    return onnx.load(str(model_path(MODEL)))


@pytest.fixture(scope="module")
def feeds():
    return data.feeds_for(MODEL, "eval", 2)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_perturbed_conv_ranks_first(reference, feeds, where):
    convs = _weighted_convs(reference)
    assert len(convs) >= 3
    conv = {"first": convs[0], "middle": convs[len(convs) // 2], "last": convs[-1]}[where]
    loc = localize(reference, perturb_conv(reference, conv), feeds)
    assert loc.reason is None and loc.samples == 2
    first, second = loc.nodes[0], loc.nodes[1]
    assert (first.node, first.op_type) == (conv.name, "Conv")
    assert first.added > 1e-3 and first.input_error == 0.0
    assert second.added < first.added / 100  # not a close call


def test_optimized_candidate_reports_only_matching_tensors(reference, feeds, optimized):
    case = optimized(MODEL)
    candidate = case.require()
    loc = localize(reference, candidate, feeds)
    # nodes computing exactly what the reference's do are compared but not ranked
    assert loc.reason is None and loc.nodes and loc.compared == len(loc.nodes) + loc.unchanged
    ref_tensors = {o for n in reference.graph.node for o in n.output}
    cand_tensors = {o for n in candidate.graph.node for o in n.output}
    for n in loc.nodes:
        assert n.output in cand_tensors and n.reference in ref_tensors
    # Some names differ (fusions write new tensors) and some are kept for a folded value;
    # neither shows up as an error.
    assert loc.skipped["not in the reference"] > 0 and loc.rematched > 0
    assert max(n.error for n in loc.nodes) < 1e-4
    assert max(n.added for n in loc.nodes) < 1e-4


def test_cli_localize_ranks_the_perturbed_conv_first(tmp_path, reference, feeds):
    conv = _weighted_convs(reference)[len(_weighted_convs(reference)) // 2]
    cand = tmp_path / "perturbed.onnx"
    onnx.save_model(perturb_conv(reference, conv), str(cand))
    for i, feed in enumerate(feeds):
        np.savez(tmp_path / f"{i:04d}.npz", **feed)
    out = tmp_path / "parity.json"
    result = CliRunner().invoke(
        app,
        ["parity", str(model_path(MODEL)), str(cand), "--inputs", str(tmp_path)]
        + ["--localize", "--json", str(out)],
    )
    assert result.exit_code == 1, result.output
    assert "where the error enters" in result.output and conv.name in result.output
    doc = json.loads(out.read_text())
    assert doc["samples"] == 2 and not doc["passed"]
    assert doc["localization"]["nodes"][0]["node"] == conv.name
