"""The whole `optimize --quantize int8` command: wall time against fp32 inference, and peak memory.

Issue 8's bars, measured the way a user runs the tool: one `calib.npz` holding N samples along
axis 0 (the layout ModelOpt's `--calibration_data` takes), fed to the whole command line.

1. Time. For each model, in one process and alternated `--rounds` times (A B A B ...): A is one
   fp32 pass of the original model over the same N samples at batch 1 (one ORT session made
   before the clock starts, 2 intra-op threads, `run` per sample); B is the whole command
   `onnxshrink optimize MODEL -o OUT --quantize int8 --calibration-data calib.npz` in a child
   process (interpreter start, loading, lossless rewrite, statistics, budget search, speed
   check and writing included). The ratio of the medians is reported (bar: at most 30x).
2. Memory. The child reports its own peak RSS (VmHWM of /proc/self/status, read as it exits:
   the high-water mark of the command's own address space, which `ru_maxrss` of a forked
   child would mix with this parent's). For ppocr-v4-rec the command also runs on a file of
   1024 samples; the ratio of the peaks, 1024 over 64, is reported (bars: at most 1.5 GB,
   growth at most 1.2x).

The data come from models/data.py's `calib` split: rendered text lines for the recognizer
(one array [N, 3, 48, 320]), tokenized sentences for MiniLM (padded to the longest of the N).

    .venv/bin/python bench/int8_command_cost.py                    # ppocr-v4-rec and minilm-l6
    .venv/bin/python bench/int8_command_cost.py --models ppocr-v4-rec --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ZOO = REPO / "models" / "zoo"
TIME_BAR = 30.0
RSS_BAR_MB = 1536.0
GROWTH_BAR = 1.2

# Runs the CLI in this interpreter and prints the address space's peak RSS as it exits.
_CHILD = """
import sys
from onnxshrink.cli import main
sys.argv = ["onnxshrink", *sys.argv[1:]]
try:
    main()
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("VMHWM_KB", int(line.split()[1]), file=sys.stderr, flush=True)
"""


def _write_calibration(name: str, n: int, path: Path) -> None:
    import numpy as np

    from models import data

    if name == "minilm-l6":
        sentences = data.corpus_sentences("calib")[:n]
        data.save_npz(data.tokenize(sentences, ZOO), path)
    else:
        feeds = data.feeds_for(name, "calib", n)
        data.save_npz({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}, path)


def _fp32_pass(name: str, calib: Path):
    """A callable timing one batch-1 pass of the original model over every sample of `calib`."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(ZOO / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    with np.load(calib) as archive:
        arrays = {k: archive[k] for k in names}
    n = len(next(iter(arrays.values())))
    feeds = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]
    session.run(None, feeds[0])

    def run() -> float:
        start = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        return time.perf_counter() - start

    return run


def _command(name: str, calib: Path, out: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, last lines of output) of the whole command."""
    args = [
        sys.executable, "-c", _CHILD, "optimize", str(ZOO / f"{name}.onnx"), "-o", str(out),
        "--quantize", "int8", "--calibration-data", str(calib),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    peak = 0.0
    for line in proc.stderr.splitlines():
        if line.startswith("VMHWM_KB"):
            peak = int(line.split()[1]) / 1024
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the command failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, peak, proc.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="ppocr-v4-rec,minilm-l6")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--memory-samples", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            calib = folder / f"{name}-{args.samples}.npz"
            _write_calibration(name, args.samples, calib)
            fp32 = _fp32_pass(name, calib)
            fp32_times, command_times, peaks = [], [], []
            summary = ""
            for _ in range(args.rounds):
                fp32_times.append(fp32())
                wall, peak, summary = _command(name, calib, folder / f"{name}.int8.onnx")
                command_times.append(wall)
                peaks.append(peak)
            row = {
                "model": name,
                "samples": args.samples,
                "fp32_pass_s": statistics.median(fp32_times),
                "command_s": statistics.median(command_times),
                "peak_mb": max(peaks),
            }
            row["time_ratio"] = row["command_s"] / row["fp32_pass_s"]
            if name.endswith("-rec") and args.memory_samples:
                big = folder / f"{name}-{args.memory_samples}.npz"
                _write_calibration(name, args.memory_samples, big)
                _, big_peak, _ = _command(name, big, folder / f"{name}.big.onnx")
                row["memory_samples"] = args.memory_samples
                row["peak_mb_big"] = big_peak
                row["growth"] = big_peak / row["peak_mb"]
                big.unlink()
            rows.append(row)
            tail = [line for line in summary.splitlines() if line.startswith("time:")]
            print(f"{name}: {tail[0] if tail else ''}", flush=True)

    print()
    print("| model | N | fp32 pass (batch 1) | whole command | ratio (bar 30x) | peak RSS | "
          "peak RSS, 1024 samples | growth (bar 1.2x) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        memory = (
            f"{r['peak_mb_big']:.0f} MB | {r['growth']:.2f}x" if "peak_mb_big" in r else "- | -"
        )
        print(
            f"| {r['model']} | {r['samples']} | {r['fp32_pass_s']:.2f} s | {r['command_s']:.1f} s "
            f"| {r['time_ratio']:.1f}x | {r['peak_mb']:.0f} MB | {memory} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
