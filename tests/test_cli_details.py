"""Details of the command line a first-time user meets: shape spellings, lossy-only options
without a lossy stage, the rules table, and what -v and -vv log."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.engine.shapes import parse_input_shapes
from onnxshrink.errors import UsageError

runner = CliRunner()


@pytest.mark.parametrize(
    "spec",
    ["x:1,3,224,224", "x:[1,3,224,224]", "x:1x3x224x224", "x: [1, 3, 224, 224]"],
)
def test_three_shape_spellings(spec):
    assert parse_input_shapes([spec]) == {"x": [1, 3, 224, 224]}


def test_a_name_with_colons_keeps_them():
    assert parse_input_shapes(["input:0:[1,3]"]) == {"input:0": [1, 3]}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("x=1,3", "expected NAME:DIMS"),
        ("x:[1,3", "unbalanced brackets"),
        ("x:1,3]", "unbalanced brackets"),
        ("x:[1;3]", "dims must be integers"),
        ("x:1xax3", "dims must be integers"),
        ("x:[1,0,3]", "dims must be positive"),
    ],
)
def test_bad_shapes_are_one_line_errors(spec, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_input_shapes([spec])
    assert "\n" not in str(info.value) and spec in str(info.value)


def test_bracketed_shape_on_the_command_line(tmp_path, conv_bn_path):
    result = runner.invoke(
        app,
        ["optimize", str(conv_bn_path), "-o", str(tmp_path / "o.onnx"), "--input-shape", "x:[1,3"],
    )
    assert result.exit_code == 2 and "unbalanced brackets" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--calibration-data", "missing.npz"], "--calibration-data: it needs --quantize or"),
        (
            ["--calibration-data", "calib.npz", "--target", "tensorrt"],
            "--calibration-data, --target: it needs --quantize or --sparsify",
        ),
        (["--block-size", "64"], "--block-size: it needs --quantize int4 (or int8+int4)"),
        (["--compress"], "--compress: it needs --sparsify,"),
    ],
)
def test_lossy_only_options_without_a_lossy_stage_are_an_error(
    tmp_path, conv_bn_path, args, message
):
    out = tmp_path / "o.onnx"
    result = runner.invoke(app, ["optimize", str(conv_bn_path), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {message}")
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_rules_table_shows_real_min_opsets_and_no_case_numbers():
    result = runner.invoke(app, ["rules"], env={"COLUMNS": "250"}, terminal_width=250)
    assert result.exit_code == 0
    rows = {
        cells[1]: cells
        for line in result.output.splitlines()
        if line.startswith("│")
        for cells in [[c.strip() for c in line.strip("│").split("│")]]
        if len(cells) == 4 and cells[1]
    }
    assert rows["fuse-layernorm"][2] == "17" and rows["fuse-gelu"][2] == "20"
    assert rows["fuse-hard-swish"][2] == "14"
    assert "case" not in result.output.lower()


def test_below_min_opset_the_fusions_still_count_each_match():
    """Raising min_opset to the truth does not turn the per-match declines into one
    whole-model line: -v still counts the decomposed LayerNorms --opset 17 would fuse."""
    from onnxshrink.engine.passes import RulePass
    from rules.layernorm import FuseLayerNorm

    rule = FuseLayerNorm()
    assert rule.min_opset == 17 and rule.matches_below_min_opset
    assert RulePass("fusion", [rule]).rules == [rule]


@pytest.mark.parametrize(
    "flags, level", [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG)]
)
@pytest.mark.parametrize("command", ["optimize", "parity", "bench"])
def test_v_is_info_and_vv_is_debug_on_every_command(tmp_path, conv_bn_path, command, flags, level):
    args = {
        "optimize": ["optimize", str(conv_bn_path), "-o", str(tmp_path / "o.onnx")],
        "parity": ["parity", str(conv_bn_path), str(conv_bn_path), "--samples", "1"],
        "bench": ["bench", str(conv_bn_path), "--runs", "1", "--warmup", "0"],
    }[command]
    result = runner.invoke(app, [*args, *flags])
    assert result.exit_code == 0, result.output
    assert logging.getLogger().level == level
    logging.getLogger().setLevel(logging.WARNING)


def test_v_logs_no_declined_match_lines(tmp_path, conv_bn_path, caplog):
    """The per-match DEBUG lines (which repeat the declined-rules table) need -vv."""
    out = str(tmp_path / "o.onnx")
    with caplog.at_level(logging.DEBUG):
        runner.invoke(app, ["optimize", str(conv_bn_path), "-o", out, "-v"])
    assert not [r for r in caplog.records if r.levelno < logging.INFO and "declined" in r.msg]
