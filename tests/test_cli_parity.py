"""`onnxshrink parity`: tables, tolerance flags, exit codes, JSON, batching, localization."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from rich.console import Console
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.cli.common import progress_bar
from tests.helpers import make_model
from tests.test_localize import build_chain, perturbed

runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, ["parity", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, str(path))
    return str(path)


_TWO_OUTPUTS = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2, 5] x) => (float[2, 5] y, float[2, 5] z) {
    y = Mul (x, s)
    z = Relu (x)
}
"""


def _two_outputs(s: list[float]) -> onnx.ModelProto:
    return make_model(_TWO_OUTPUTS, {"s": np.array(s, np.float32)})


@pytest.fixture
def pair(tmp_path):
    """(reference, candidate) paths: `y` of the candidate moves on its last column by 5%."""
    ref = _save(_two_outputs([1, 1, 1, 1, 1]), tmp_path / "ref.onnx")
    cand = _save(_two_outputs([1, 1, 1, 1, 1.05]), tmp_path / "cand.onnx")
    return ref, cand


def test_identical_models_pass_with_the_table(tmp_path):
    ref = _save(build_chain(), tmp_path / "a.onnx")
    result = _run(ref, ref)
    assert result.exit_code == 0, result.output
    for word in ("max abs", "mean abs", "max rel", "cosine", "SNR dB", "argmax agr.", "ok"):
        assert word in result.output
    assert "4 input sample(s) on generated inputs" in " ".join(result.output.split())
    assert "where the error enters" not in result.output  # only on failure or --localize


def test_failure_exits_1_and_localizes(tmp_path):
    ref_model = build_chain()
    ref = _save(ref_model, tmp_path / "ref.onnx")
    cand = _save(perturbed(ref_model, "w2"), tmp_path / "cand.onnx")
    result = _run(ref, cand, "--top", "3", "--input-range", "-1,1")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "where the error enters" in result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ ")]
    ranked = [r for r in rows if r.split("│")[1].strip().isdigit()]
    # Only the perturbed Conv is ranked: the other nodes are the reference's own.
    assert len(ranked) == 1 and "not ranked: 4 nodes" in result.output
    # The legend says what each of the figure columns is.
    legend = " ".join(result.output.split())
    assert all(f"{column}:" in legend for column in ("error", "at inputs", "added"))
    first = [cell.strip() for cell in ranked[0].split("│")]
    assert first[1:3] == ["1", "Conv"] and first[4] == "b"
    assert _run(ref, cand, "--no-localize").output.count("where the error enters") == 0
    forced = _run(ref, ref, "--localize")
    assert forced.exit_code == 0 and "not ranked: 5 nodes" in forced.output


def test_per_output_override_turns_a_failure_into_a_pass(pair):
    ref, cand = pair
    failed = _run(*pair, "--no-localize")
    assert failed.exit_code == 1 and "FAIL y:" in failed.output
    assert _run(ref, cand, "--rtol", "y:0.1").exit_code == 0
    assert _run(ref, cand, "--rtol", "z:0.1", "--no-localize").exit_code == 1
    assert _run(ref, cand, "--atol", "y:0.1").exit_code == 0
    assert _run(ref, cand, "--rtol", "0.1").exit_code == 0


def test_min_cosine_fails_below_the_bar(pair):
    ref, cand = pair
    assert _run(ref, cand, "--rtol", "0.1", "--min-cosine", "0.99").exit_code == 0
    result = _run(ref, cand, "--rtol", "0.1", "--min-cosine", "0.99999", "--no-localize")
    assert result.exit_code == 1 and "cosine" in result.output and "min cosine" in result.output
    # z is untouched and keeps passing; an override lowers the bar for y alone
    assert (
        _run(
            ref, cand, "--rtol", "0.1", "--min-cosine", "0.99999", "--min-cosine", "y:0.99"
        ).exit_code
        == 0
    )


def test_error_stat_median_accepts_a_few_outliers(pair):
    ref, cand = pair
    # one column in five moves: the median error is 0, the 0.9 quantile is not
    assert _run(ref, cand, "--check-error-stat", "median").exit_code == 0
    result = _run(
        ref,
        cand,
        "--check-error-stat",
        "quantile",
        "--error-quantile",
        "0.9",
        "--no-localize",
    )
    assert result.exit_code == 1 and "q0.9 abs error" in result.output
    assert "checked: q0.9" in result.output  # the table shows the checked statistic
    # beside "mean abs", a "mean" check is named for what it is, and a legend says both
    mean = _run(ref, cand, "--check-error-stat", "mean", "--no-localize")
    assert "mean abs" in mean.output and "checked: mean" in mean.output
    assert "mean err" not in mean.output
    assert "over every element of every run" in mean.output and "the worst run" in mean.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--atol", "abc"], "bad --atol 'abc'"),
        (["--rtol", "y:x"], "bad --rtol 'y:x'"),
        (["--atol", "nope:1e-3"], "'nope': not an output of the reference model"),
        (["--min-cosine", "2"], "a cosine lies in [-1, 1]"),
        (["--input-range", "x:1,0"], "LOW must be below HIGH"),
        (["--input-range", "q:0,1"], "'q' is not a model input"),
        (["--input-shape", "q:2,5"], "q is not a model input"),
        (["--inputs", "{tmp}/none.npz"], "no such file"),
        (["--inputs", "{tmp}/x.npz", "--samples", "3"], "--samples shape generated inputs"),
        (["--json", "{tmp}/no/such/dir/out.json"], "does not exist"),
        (["--check-error-stat", "p99"], "p99"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, pair, args, message):
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 5), np.float32))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = _run(*pair, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    if "--check-error-stat" not in args:
        assert result.output.count("error:") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_missing_model_exits_2(tmp_path, pair):
    result = _run(pair[0], tmp_path / "absent.onnx")
    assert result.exit_code == 2 and "no such file" in result.output


def test_json_holds_every_figure(tmp_path, pair):
    ref, cand = pair
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "parity.json"
    result = _run(ref, cand, "--inputs", tmp_path / "x.npz", "--json", out, "--atol", "z:1e-3")
    assert result.exit_code == 1
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["samples"] == 1
    assert doc["criteria"]["overrides"] == {"z": {"atol": 1e-3}}
    assert doc["inputs"]["source"] == str(tmp_path / "x.npz")
    y, z = doc["outputs"]
    assert (y["name"], y["ok"], z["name"], z["ok"]) == ("y", False, "z", True)
    assert z["snr_db"] == "inf" and z["cosine"] == 1.0 and z["atol"] == 1e-3
    r = x.astype(np.float64)
    c = _ort(cand, x)[0].astype(np.float64)
    d = c - r
    assert y["max_abs"] == pytest.approx(np.abs(d).max())
    assert y["mean_abs"] == pytest.approx(np.abs(d).mean())
    assert y["cosine"] == pytest.approx(
        r.ravel() @ c.ravel() / np.linalg.norm(r) / np.linalg.norm(c)
    )
    assert y["snr_db"] == pytest.approx(10 * np.log10((r**2).sum() / (d**2).sum()))
    assert y["argmax_agreement"] == pytest.approx((r.argmax(-1) == c.argmax(-1)).mean())
    assert "max abs error" in y["reason"]
    loc = doc["localization"]  # ran on the failure
    assert loc["nodes"][0]["output"] == "y" and loc["compared_tensors"] == 2
    assert set(doc["versions"]) == {"onnxshrink", "onnxruntime", "onnx"}


def test_json_to_stdout_is_pure_json(pair):
    result = _run(*pair, "--rtol", "0.1", "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["passed"] is True and doc["localization"] is None


def _ort(path: str, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


_FIXED_BATCH = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[{batch}, 3] x) => (float[{batch}, 3] y) {{
    y = Relu (x)
}}
"""


@pytest.mark.parametrize(
    "batch_dim, args, runs",
    [("2", [], 3), ("N", [], 1), ("N", ["--batch", "4"], 2), ("N", ["--batch", "1"], 6)],
)
def test_npz_is_split_along_axis_0(tmp_path, batch_dim, args, runs):
    model = _save(make_model(_FIXED_BATCH.format(batch=batch_dim)), tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((6, 3), np.float32))
    out = tmp_path / "p.json"
    result = _run(model, model, "--inputs", tmp_path / "x.npz", "--json", out, *args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["samples"] == runs and doc["inputs"]["runs"] == runs
    assert doc["outputs"][0]["elements"] == 18


def test_npz_that_does_not_fit_a_fixed_batch_exits_2(tmp_path):
    model = _save(make_model(_FIXED_BATCH.format(batch="2")), tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((5, 3), np.float32))
    result = _run(model, model, "--inputs", tmp_path / "x.npz")
    assert result.exit_code == 2 and "fixed batch of 2" in result.output


def test_help_explains_the_options():
    result = runner.invoke(app, ["parity", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("--check-error-stat", "--min-cosine", "--localize", "--input-range", "Examples"):
        assert text in result.output


def test_progress_bar_on_a_terminal_plain_lines_off_one():
    plain = Console(file=io.StringIO())
    with progress_bar(plain, "parity", unit="runs") as callback:
        assert callback is not None
        callback(1, 2)
        callback(2, 2)
    lines = plain.file.getvalue().splitlines()
    assert lines[0] == "progress: parity 1/2 runs"
    assert lines[-1].startswith("progress: parity 2/2 runs")
    with progress_bar(plain, "parity", enabled=False) as callback:
        assert callback is None
    terminal = Console(file=io.StringIO(), force_terminal=True)
    with progress_bar(terminal, "parity") as callback:
        callback(1, 2)
        callback(2, 2)
    assert "parity" in terminal.file.getvalue()
