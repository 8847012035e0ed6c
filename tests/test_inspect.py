"""`onnxshrink inspect`: the model's account, the lossless preview with its opset hints, the
int8 plan per target, --json, and one-line errors (onnxshrink.engine.inspect, cli.inspect)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.engine.inspect import inspect_model, inspect_path
from tests.helpers import make_model

runner = CliRunner()

# Two erf GELUs (as torch exports them) at opset 17 between MatMuls with constant weights; the
# last MatMul's B is the input r, an activation no int8 plan quantizes.
_GELU_17 = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,32] x, float[32,32] r) => (float[N,32] y) {
    sqrt2 = Constant<value = float {1.4142135}>()
    one = Constant<value = float {1.0}>()
    half = Constant<value = float {0.5}>()
    m = MatMul(x, w1)
    t = Div(m, sqrt2)
    e = Erf(t)
    a = Add(e, one)
    h = Mul(m, half)
    g1 = Mul(h, a)
    t2 = Div(g1, sqrt2)
    e2 = Erf(t2)
    a2 = Add(e2, one)
    h2 = Mul(g1, half)
    g2 = Mul(h2, a2)
    q = MatMul(g2, w2)
    y = MatMul(q, r)
}"""


def _gelu_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=(32, 32)).astype(np.float32) for name in ("w1", "w2")}
    return make_model(_GELU_17, weights)


def _if_loop_model() -> onnx.ModelProto:
    """An If with two branches, and a Loop whose body holds an If of its own."""
    return make_model("""<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[4] x) => (float[4] y, float[4] z) {
    y = If(c) <
        then_branch = then_g () => (float[4] a) { a = Relu(x) },
        else_branch = else_g () => (float[4] b) { n = Neg(x)
                                                  b = Abs(n) }
    >
    trip = Constant<value = int64 {2}>()
    z = Loop(trip, c, x) <body = body (int64 i, bool cin, float[4] v) => (bool cout, float[4] w) {
        cout = Identity(cin)
        w = If(cin) <
            then_branch = t2 () => (float[4] p) { p = Relu(v) },
            else_branch = e2 () => (float[4] q) { q = Identity(v) }
        >
    }>
}""")


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _invoke(*args: str):
    result = runner.invoke(app, ["inspect", *args])
    assert "Traceback" not in result.output
    return result


def _json(*args: str) -> dict:
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_gelu_at_opset_17_hints_opset_20(tmp_path):
    path = _save(_gelu_model(), tmp_path / "gelu.onnx")
    result = _invoke(str(path))
    assert result.exit_code == 0, result.output
    assert "fuse-gelu: 2 pattern(s) found, needs --opset 20 (model is 17)" in result.output
    assert "with --opset 20:" in result.output and "Gelu +2" in result.output
    assert "Gelu needs opset 20" in result.output  # the declined table, without -v

    unlock = _json(str(path))["optimize"]["unlocks"]
    assert len(unlock) == 1 and unlock[0]["opset"] == 20 and unlock[0]["error"] is None
    assert unlock[0]["rules"] == [{"rule": "fuse-gelu", "needs_opset": 20, "found": 2, "fires": 2}]
    assert unlock[0]["op_changes"]["Gelu"] == 2 and unlock[0]["op_changes"]["Erf"] == -2


def test_opset_option_previews_at_that_opset(tmp_path):
    path = _save(_gelu_model(), tmp_path / "gelu.onnx")
    data = _json(str(path), "--opset", "20")
    assert data["optimize"]["opset"] == 20
    assert data["optimize"]["applied"]["fuse-gelu"] == 2
    assert data["optimize"]["unlocks"] == []
    assert data["opsets"] == {"ai.onnx": 17}  # the model's own, as it is on disk


def test_json_has_every_field(tmp_path):
    path = _save(_gelu_model(), tmp_path / "gelu.onnx")
    data = _json(str(path))
    for key in (
        "path",
        "ir_version",
        "producer",
        "opsets",
        "inputs",
        "outputs",
        "nodes",
        "nodes_total",
        "ops",
        "initializers",
        "parameters",
        "bytes",
        "file_bytes",
        "external_data",
        "subgraphs",
        "optimize",
        "int8",
    ):
        assert key in data, key
    assert data["inputs"][0] == {"name": "x", "dtype": "float", "shape": ["N", 32]}
    assert data["outputs"] == [{"name": "y", "dtype": "float", "shape": ["N", 32]}]
    assert data["opsets"] == {"ai.onnx": 17} and data["ir_version"] == 8
    assert data["ops"]["MatMul"] == 3 and data["ops"]["Erf"] == 2
    assert data["initializers"] == 2 and data["parameters"] >= 2 * 32 * 32
    assert data["file_bytes"] == path.stat().st_size
    assert data["external_data"] == {"bytes": 0, "files": []}
    assert data["subgraphs"] == []
    opt = data["optimize"]
    assert opt["nodes_before"] == len(_gelu_model().graph.node) and opt["nodes_after"] > 0
    assert {"rule": "fuse-gelu", "reason": "Gelu needs opset 20", "count": 2} in opt["declined"]


def test_int8_plan_per_target_without_calibration(tmp_path):
    path = _save(_gelu_model(), tmp_path / "gelu.onnx")
    plans = {p["target"]: p for p in _json(str(path))["int8"]}
    assert set(plans) == {"ort-cpu", "ort-cuda", "tensorrt"}
    reason = "B is not a constant initializer"  # y = MatMul(q, r): r is an input
    for plan in plans.values():
        assert plan["layers"] == 3
        assert plan["reasons"][reason] == 1
    assert plans["ort-cpu"]["int8_compute"] == 2 and plans["ort-cpu"]["float"] == 1
    assert plans["tensorrt"]["int8_compute"] == 2
    # the CUDA EP computes in float: the weights are stored int8
    assert plans["ort-cuda"]["int8_compute"] == 0 and plans["ort-cuda"]["int8_weights"] == 2
    text = _invoke(str(path)).output
    assert "int8 plan per --target" in text and reason in text


def test_external_data_counted(tmp_path):
    model = _gelu_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.weights",
        size_threshold=0,
    )
    data_file = tmp_path / "ext.weights"
    data = _json(str(path))
    ext = data["external_data"]
    assert ext["bytes"] == data_file.stat().st_size >= 2 * 32 * 32 * 4
    assert ext["files"] == [
        {"location": "ext.weights", "bytes": data_file.stat().st_size, "tensors": 2}
    ]
    assert data["file_bytes"] == path.stat().st_size + data_file.stat().st_size
    text = _invoke(str(path)).output
    assert "external data:" in text and "ext.weights" in text


def test_subgraphs_listed_with_node_counts(tmp_path):
    path = _save(_if_loop_model(), tmp_path / "sub.onnx")
    data = _json(str(path))
    subs = [
        (s["op"], s["attribute"], s["nodes"], s["nodes_total"], s["depth"])
        for s in data["subgraphs"]
    ]
    assert subs == [
        ("If", "then_branch", 1, 1, 1),
        ("If", "else_branch", 2, 2, 1),
        ("Loop", "body", 2, 4, 1),
        ("If", "then_branch", 1, 1, 2),
        ("If", "else_branch", 1, 1, 2),
    ]
    assert data["nodes_total"] == data["nodes"] + 1 + 2 + 2 + 1 + 1
    text = _invoke(str(path)).output
    assert "subgraphs: 5" in text and "Loop" in text


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda t: t / "absent.onnx", "no such file"),
        (lambda t: t, "is a directory"),
        (lambda t: _text_file(t / "notes.onnx"), "not a readable ONNX model"),
    ],
    ids=["missing", "directory", "not-onnx"],
)
def test_bad_input_one_line_exit_2(tmp_path, make_path, message):
    for extra in ([], ["--json"]):
        result = _invoke(str(make_path(tmp_path)), *extra)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert result.output.strip().count("\n") == 0 and result.output.startswith("error:")


def _text_file(path: Path) -> Path:
    path.write_bytes(b"\x08\x07garbage" * 10)
    return path


def test_opset_below_the_models_is_exit_2(tmp_path):
    path = _save(_gelu_model(), tmp_path / "gelu.onnx")
    result = _invoke(str(path), "--opset", "13")
    assert result.exit_code == 2
    assert "lower than the model's opset 17" in result.output


def test_nothing_written_and_model_unchanged(tmp_path):
    model = _gelu_model()
    before = model.SerializeToString()
    path = _save(model, tmp_path / "gelu.onnx")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert _invoke(str(path)).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gelu.onnx"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    result = inspect_model(model)
    assert model.SerializeToString() == before
    json.dumps(result.to_json())  # the library result is JSON-able as it stands
    assert result.path is None and result.file_bytes is None


def test_conv_bn_preview_fires_and_declines(conv_bn_path):
    result = inspect_path(conv_bn_path)
    assert result.optimize.applied["fold-batchnorm"] == 1
    assert result.optimize.nodes_after == 1  # one Conv
    assert result.constants == 1  # the weight is a Constant node
    assert result.optimize.unlocks == [] and result.optimize.error is None


def test_help_has_examples():
    result = runner.invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "onnxshrink inspect model.onnx --json" in result.output
