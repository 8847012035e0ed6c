"""The command line: tables on success, one clear line and the documented exit code on failure."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from onnxshrink.cli import app

runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_optimize_prints_before_after_table(tmp_path, conv_bn_path):
    out = tmp_path / "o.onnx"
    result = _run("optimize", str(conv_bn_path), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.exists()
    for word in ("nodes", "parameters", "size", "parity", "ok"):
        assert word in result.output


def test_default_output_path_is_beside_input(conv_bn_path):
    result = _run("optimize", str(conv_bn_path))
    assert result.exit_code == 0, result.output
    assert conv_bn_path.with_name("conv_bn.opt.onnx").exists()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p, t: ["optimize", str(t / "absent.onnx")], "no such file"),
        (lambda p, t: ["optimize", str(p), "-o", str(t / "no" / "o.onnx")], "does not exist"),
        (lambda p, t: ["optimize", str(p), "--input-shape", "x=1,2"], "bad --input-shape"),
        (lambda p, t: ["optimize", str(p), "--input-shape", "q:1,3,8,8"], "not a model input"),
        (lambda p, t: ["optimize", str(p), "--inputs", str(t / "none.npz")], "no such file"),
        (lambda p, t: ["optimize", str(p), "--opset", "7"], "lower than the model's opset"),
        (lambda p, t: ["optimize", str(p), "--sparsify", "channels:1.5"], "must be in (0, 1)"),
        (lambda p, t: ["optimize", str(p), "--sparsify", "4:2"], "needs 0 < N < M"),
        (lambda p, t: ["optimize", str(p), "--sparsify", "rows:0.5"], "expected unstructured:R"),
        (lambda p, t: ["optimize", str(p), "--compress"], "it needs --sparsify"),
        (
            lambda p, t: ["optimize", str(p), "--sparsify", "channels:0.5", "--compress"],
            "it needs --sparsify unstructured:R or N:M",
        ),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(tmp_path, conv_bn_path, make_args, message):
    before = hashlib.sha256(conv_bn_path.read_bytes()).hexdigest()
    result = _run(*make_args(conv_bn_path, tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1
    assert hashlib.sha256(conv_bn_path.read_bytes()).hexdigest() == before
    assert not any(p.suffix == ".tmp" for p in tmp_path.rglob("*"))


def test_not_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    result = _run("optimize", str(bad))
    assert result.exit_code == 2
    assert "error:" in result.output


def test_inputs_npz_used_for_parity(tmp_path, conv_bn_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    result = _run(
        "optimize",
        str(conv_bn_path),
        "-o",
        str(tmp_path / "o.onnx"),
        "--inputs",
        str(tmp_path / "in.npz"),
    )
    assert result.exit_code == 0, result.output
    assert "1 input sample" in result.output


def test_rules_command_lists_rules():
    result = _run("rules")
    assert result.exit_code == 0
    assert "constant-folding" in result.output


def test_console_script_help_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "onnxshrink", "optimize", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "--input-shape" in proc.stdout and "Exit codes" in proc.stdout


def test_optimize_report_and_bench(tmp_path, conv_bn_path):
    from html.parser import HTMLParser

    report = tmp_path / "r.html"
    result = _run(
        "optimize", str(conv_bn_path), "-o", str(tmp_path / "o.onnx"),
        "--report", str(report), "--bench", "--bench-runs", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "p50 ms" in result.output and "report:" in result.output

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

    parser = Tags()
    parser.feed(report.read_text())
    assert parser.tags.count("table") >= 4 and "img" in parser.tags
    assert "Benchmark" in report.read_text()


def test_bad_report_suffix_fails_before_any_work(tmp_path, conv_bn_path):
    out = tmp_path / "o.onnx"
    result = _run(
        "optimize", str(conv_bn_path), "-o", str(out), "--report", str(tmp_path / "r.txt")
    )
    assert result.exit_code == 2
    assert "unknown report format" in result.output
    assert not out.exists()


def test_optimize_help_documents_int8():
    result = _run("optimize", "--help")
    assert result.exit_code == 0
    for option in ("--quantize", "--calibration-data", "--calibration-method", "--target",
                   "--exclude", "--max-error", "--calibration-provider", "--no-speed-check",
                   "--sparsify", "--compress"):  # fmt: skip
        assert option in result.output
    assert "20 dB" in result.output


def test_debug_verify_broken_pass_gets_one_line_and_exit_1(tmp_path, conv_bn_path, monkeypatch):
    import onnxshrink.rules
    from onnxshrink.engine.passes import FunctionPass
    from tests.helpers import scale_weights

    out = tmp_path / "o.onnx"
    good = _run("optimize", str(conv_bn_path), "-o", str(out), "--debug-verify")
    assert good.exit_code == 0, good.output
    out.unlink()
    default = onnxshrink.rules.lossless_passes
    monkeypatch.setattr(
        onnxshrink.rules,
        "lossless_passes",
        lambda: [*default(), FunctionPass("scale-weights", scale_weights)],
    )
    result = _run("optimize", str(conv_bn_path), "-o", str(out), "--debug-verify")
    assert result.exit_code == 1, result.output
    assert result.output.count("error:") == 1
    assert "pass 'scale-weights' (sweep 1) broke the model" in result.output
    assert "internal error" not in result.output
    assert not out.exists()


def test_debug_verify_is_documented_in_help():
    result = _run("optimize", "--help")
    assert "--debug-verify" in result.output


def test_markup_like_names_and_paths_print_as_they_are(tmp_path):
    """Issue 9, 6: `[/x]` in a tensor name or a path is the user's text, not rich markup."""
    import onnx

    from tests.helpers import make_model

    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[2,4] x) => (float[2,4] "logits[/0]") {
            t = Identity (x)
            "logits[/0]" = Relu (t)
        }
        """
    )
    folder = tmp_path / "run[/x]"  # the folder "run[" and in it "x]"
    folder.mkdir(parents=True)
    src, dst = folder / "m[b].onnx", folder / "o[i].onnx"
    onnx.save(model, str(src))
    result = _run("optimize", str(src), "-o", str(dst))
    assert result.exit_code == 0, result.output
    assert "logits[/0]" in result.output and "run[/x]/m[b].onnx" in result.output
    assert dst.exists()
    parity = _run("parity", str(src), str(dst))
    assert parity.exit_code == 0, parity.output
    assert "logits[/0]" in parity.output and "Traceback" not in parity.output


def test_minor_bad_inputs_are_one_line_exit_2(tmp_path, conv_bn_path):
    """Issue 9, 9: an int64-overflowing --input-shape, an object-array .npz, a newline in a
    file name: one line, exit 2; and outputs get the umask's permissions, not 0600."""
    import os

    huge = _run("optimize", str(conv_bn_path), "-o", str(tmp_path / "h.onnx"),
                "--input-shape", f"x:{2**63},3,8,8")  # fmt: skip
    assert huge.exit_code == 2 and "int64" in huge.output
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object))
    obj = _run(
        "optimize", str(conv_bn_path), "-o", str(tmp_path / "o.onnx"), "--inputs", str(objects)
    )
    assert obj.exit_code == 2 and "Python objects" in obj.output
    newline = _run("optimize", str(tmp_path / "two\nlines.onnx"))
    assert newline.exit_code == 2 and newline.output.count("\n") == 1, newline.output
    out = tmp_path / "perm.onnx"
    old = os.umask(0o022)
    try:
        assert _run("optimize", str(conv_bn_path), "-o", str(out)).exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: setattr(t, "data_type", 99), "unknown data type 99"),
        (lambda t: setattr(t, "raw_data", t.raw_data + b"\0" * 4), "holds 20 bytes of raw_data"),
    ],
)
def test_bad_tensor_data_is_exit_2_not_an_internal_error(tmp_path, conv_bn_model, corrupt, message):
    """Issue 9, 9: an unknown data type, or initializer data longer than its dims say."""
    import onnx

    corrupt(conv_bn_model.graph.initializer[0])
    path = tmp_path / "bad.onnx"
    onnx.save_model(conv_bn_model, str(path))
    result = _run("optimize", str(path), "-o", str(tmp_path / "o.onnx"))
    assert result.exit_code == 2, result.output
    assert message in result.output and "'gamma'" in result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


def test_parity_run_past_the_time_limit_is_one_line_exit_1(tmp_path):
    """Issue 9, 7: a Loop with trip count INT64_MAX no longer hangs optimize or parity."""
    import onnx

    from tests.helpers import endless_loop_model

    path = tmp_path / "loop.onnx"
    onnx.save_model(endless_loop_model(), str(path))
    out = tmp_path / "o.onnx"
    result = _run("optimize", str(path), "-o", str(out), "--time-limit", "0.5")
    assert result.exit_code == 1, result.output
    assert (
        "exceeded the time limit of 0.5 s" in result.output and "nothing written" in result.output
    )
    assert result.output.count("\n") == 1
    assert not out.exists()
    parity = _run("parity", str(path), str(path), "--time-limit", "0.5", "--samples", "1")
    assert parity.exit_code == 1, parity.output
    assert "exceeded the time limit of 0.5 s (the reference model" in parity.output
    assert parity.output.count("\n") == 1


def test_time_limit_is_documented_in_help():
    for command in ("optimize", "parity"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--time-limit" in result.output


@pytest.mark.parametrize("place", ["function body", "sparse initializer values"])
def test_external_data_outside_the_folder_anywhere_is_exit_2(tmp_path, conv_bn_model, place):
    """Issue 9, 8: a reference out of the folder in a function body or a sparse tensor."""
    import onnx

    from tests.test_io import _external_tensor, _place_external

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "link.bin").symlink_to(secret)
    _place_external(conv_bn_model, place, _external_tensor("link.bin"))
    path = folder / "ext.onnx"
    onnx.save_model(conv_bn_model, str(path))
    result = _run("optimize", str(path), "-o", str(tmp_path / "o.onnx"))
    assert result.exit_code == 2, result.output
    assert "outside the model's folder" in result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()
