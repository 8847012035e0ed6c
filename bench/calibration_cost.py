"""Calibration cost on a zoo model: time against plain inference, and memory against sample count.

Issue 4 asks that calibration (1) take at most 3x the time of plain fp32 inference over the same
samples and (2) peak at most 1.2x the memory with 1024 samples that it needs with 64. This
script measures both for the statistics pass `onnxshrink optimize --quantize int8` runs
(`onnxshrink.quant.calibration.collect_statistics` on the lossless model, every tensor
`quantize.activation_tensors` names, per-channel means for bias correction):

1. Time. In one process, over the same N feeds read from a folder of .npz files (as
   `--calibration-data DIR` reads them): plain inference (one ORT session, `run` per feed) and
   the statistics pass, alternated `--rounds` times (A B A B ...), so that load from other
   processes hits both alike; the ratio of the medians is reported.
2. Memory. One fresh child process per N: it loads the lossless model from a file, runs the
   statistics pass over N feeds and reports its peak RSS (VmHWM) and the RSS before the pass;
   the ratio of the peaks, N=1024 over N=64, is reported.

    .venv/bin/python bench/calibration_cost.py                          # ppocr-v4-rec, percentile
    .venv/bin/python bench/calibration_cost.py --model ppocr-v4-det --time-feeds 32 --memory-feeds 64,256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {"det": [1, 3, 640, 640], "rec": [1, 3, 48, 320], "cls": [1, 3, 48, 192]}


def _lossless(name: str):
    import onnx

    import onnxshrink

    source = REPO / "models" / "zoo" / f"{name}.onnx"
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    shape = SHAPES[name.rsplit("-", 1)[-1]]
    return onnxshrink.optimize(source, None, input_shapes={input_name: shape}).model


def _statistics(model, folder: Path, method: str) -> int:
    from onnxshrink.quant.calibration import calibration_feeds, collect_statistics
    from onnxshrink.rules.qdq import activation_tensors, bias_correction_axes

    feeds = calibration_feeds(folder, model)
    stats = collect_statistics(
        model,
        activation_tensors(model),
        feeds,
        method=method,
        mean_axes=bias_correction_axes(model),
    )
    return len(stats.ranges)


def _write_feeds(name: str, n: int, folder: Path) -> None:
    from models import data

    if len(list(folder.glob("*.npz"))) >= n:
        return
    data.save_npz(data.feeds_for(name, "calib", n), folder)


def _memory_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process from /proc, in MB.

    Not `ru_maxrss`: Linux carries the parent's high-water mark into a child across fork and
    exec, which hid the child's own peak behind the parent's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _child(args: list[str]) -> int:
    """`--child LOSSLESS.onnx FOLDER N METHOD`: one statistics pass, print peak RSS as JSON.

    The lossless model is loaded from a file, not optimized here: the optimizer's own peak
    would otherwise hide the pass's (`ru_maxrss` is a high-water mark).
    """
    import onnx

    path, folder, n, method = args[0], Path(args[1]), int(args[2]), args[3]
    model = onnx.load(path)
    sub = Path(tempfile.mkdtemp())
    for i, f in enumerate(sorted(folder.glob("*.npz"))[:n]):
        (sub / f"{i:05d}.npz").symlink_to(f)
    before = _memory_mb("VmRSS")
    start = time.perf_counter()
    tensors = _statistics(model, sub, method)
    print(
        json.dumps(
            {
                "n": n,
                "method": method,
                "tensors": tensors,
                "seconds": time.perf_counter() - start,
                "peak_mb": _memory_mb("VmHWM"),
                "before_mb": before,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocr-v4-rec")
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--time-feeds", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-feeds", default="64,1024")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "calib_cost")
    ns = parser.parse_args(argv)
    counts = [int(c) for c in ns.memory_feeds.split(",")]
    folder = ns.work / ns.model
    print(f"writing up to {max(counts + [ns.time_feeds])} calibration feeds ...", file=sys.stderr)
    _write_feeds(ns.model, max(counts + [ns.time_feeds]), folder)

    import onnx

    from onnxshrink.verify.parity import ort_session

    model = _lossless(ns.model)
    lossless_path = ns.work / f"{ns.model}.lossless.onnx"
    onnx.save(model, str(lossless_path))
    sub = ns.work / f"{ns.model}.time"
    sub.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(folder.glob("*.npz"))[: ns.time_feeds]):
        link = sub / f"{i:05d}.npz"
        if not link.exists():
            link.symlink_to(f)
    from onnxshrink.quant.calibration import calibration_feeds

    feeds = calibration_feeds(sub, model)
    sess = ort_session(model)
    plain, calib = [], []
    for r in range(ns.rounds):
        print(f"time round {r + 1}/{ns.rounds} ...", file=sys.stderr)
        start = time.perf_counter()
        for feed in feeds:
            sess.run(None, feed)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        _statistics(model, sub, ns.method)
        calib.append(time.perf_counter() - start)
    p, c = statistics.median(plain), statistics.median(calib)
    print(
        f"{ns.model}, {ns.time_feeds} feeds, method {ns.method}: plain inference {p:.2f} s, "
        f"statistics pass {c:.2f} s (medians of {ns.rounds} alternated rounds): {c / p:.2f}x"
    )
    peaks = {}
    for n in counts:
        print(f"memory: {n} feeds in a fresh process ...", file=sys.stderr)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(lossless_path),
                str(folder),
                str(n),
                ns.method,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        peaks[n] = row["peak_mb"]
        print(
            f"  {n} feeds: peak RSS {row['peak_mb']:.0f} MB (before the pass "
            f"{row['before_mb']:.0f} MB), {row['seconds']:.1f} s"
        )
    if len(counts) >= 2:
        lo, hi = min(counts), max(counts)
        print(f"peak RSS {hi} vs {lo} feeds: {peaks[hi] / peaks[lo]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
