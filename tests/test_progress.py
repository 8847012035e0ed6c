"""Progress (issue 12, 2): rich bars on a terminal, throttled plain lines on stderr off one
(CI logs, `| tee`, nohup), never on stdout."""

from __future__ import annotations

import io

import onnx
from rich.console import Console
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.cli.common import PlainProgress, staged_progress
from tests.helpers import dense_net, sample_file

runner = CliRunner()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress_lines(text: str, stage: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"progress: {stage} ")]


def test_plain_lines_are_throttled_first_and_last_kept():
    file, clock = io.StringIO(), _Clock()
    plain = PlainProgress(file, {"calibration": "runs"}, interval=10.0, clock=clock)
    for done in range(1, 36):  # one run a second
        plain.update("calibration", done, 35)
        clock.now += 1.0
    plain.close()
    lines = file.getvalue().splitlines()
    assert lines[0] == "progress: calibration 1/35 runs"
    assert lines[1] == "progress: calibration 11/35 runs, 10 s elapsed, ~24 s left"
    assert lines[-1] == "progress: calibration 35/35 runs, 34 s elapsed"
    assert len(lines) == 5  # 1, 11, 21, 31, 35: at most one per 10 s, plus the last


def test_unknown_total_counts_without_a_total_and_ends_with_the_last():
    file, clock = io.StringIO(), _Clock()
    plain = PlainProgress(file, {"calibration": "runs"}, interval=10.0, clock=clock)
    for done in range(1, 6):  # a loader: no length up front (total 0)
        plain.update("calibration", done, 0)
        clock.now += 1.0
    plain.update("sensitivity", 1, 3)  # the next stage: the last count is printed first
    lines = file.getvalue().splitlines()
    assert lines == [
        "progress: calibration 1 runs",
        "progress: calibration 5 runs, 5 s elapsed",
        "progress: sensitivity 1/3",
    ]
    assert not any("/1" in line or " 0/" in line for line in lines[:2])


def test_terminal_bars_count_without_a_total_when_it_is_unknown():
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with staged_progress(terminal, "optimizing m", {"calibration": "runs"}) as update:
        assert update is not None
        update("calibration", 3, 0)
        update("speed check", 5, 20)
    shown = terminal.file.getvalue()
    assert "calibration" in shown and "speed check" in shown
    assert "0/1" not in shown and "3/3" not in shown


def test_captured_runs_print_progress_on_stderr_only(tmp_path):
    model = tmp_path / "dyn.onnx"
    onnx.save(dense_net(), str(model))
    held = sample_file(tmp_path / "held.npz", 128, seed=2)
    calib = sample_file(tmp_path / "calib.npz", 64, seed=1)

    parity = runner.invoke(app, ["parity", str(model), str(model), "--inputs", held])
    assert parity.exit_code == 0, parity.output
    lines = _progress_lines(parity.stderr, "parity")
    # 16 fast runs: the first and the last line, the rest throttled
    assert lines[0] == "progress: parity 1/16 runs" and lines[-1].startswith(
        "progress: parity 16/16 runs, "
    )
    assert len(lines) == 2
    assert "progress:" not in parity.stdout

    result = runner.invoke(
        app,
        [
            "optimize", str(model), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8",
            "--calibration-data", calib, "--inputs", held, "--max-error", "1", "--bench",
            "--bench-runs", "2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for stage, last in (
        ("parity", "16/16 runs"),
        ("calibration", "8/8 runs"),
        ("speed check", "20/20 rounds"),
        ("held-out check", "16/16 runs"),
        ("benchmarking", "12/12 rounds"),
    ):
        lines = _progress_lines(result.stderr, stage)
        assert lines and lines[-1].startswith(f"progress: {stage} {last}"), result.stderr
    assert "progress:" not in result.stdout


def test_loader_fed_calibration_counts_runs_without_a_total(tmp_path):
    model = tmp_path / "dyn.onnx"
    onnx.save(dense_net(), str(model))
    loader = tmp_path / "loader.py"
    loader.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    for i in range(3):\n"
        "        yield {'x': np.random.default_rng(i).normal(size=(4, 16)).astype(np.float32)}\n"
    )
    result = runner.invoke(
        app,
        [
            "optimize", str(model), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8",
            "--calibration-data", str(loader), "--max-error", "1", "--no-speed-check",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = _progress_lines(result.stderr, "calibration")
    assert lines[0] == "progress: calibration 1 runs"
    assert lines[-1].startswith("progress: calibration 3 runs, ")
    assert not any("/" in line.split(",")[0] for line in lines)
