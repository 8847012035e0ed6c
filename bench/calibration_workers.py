"""Data-parallel calibration (`optimize --calibration-workers N`, issue 13): time and exactness.

The statistics pass `onnxshrink optimize --quantize int8` runs (the int8 stage's
`collect_statistics` call: every activation tensor the target quantizes, per-channel means for
bias correction, per-channel ranges for smoothing, the budget's reference outputs kept from the
same pass) on a zoo model's lossless rewrite, with N samples in one `calib.npz` (runs of 8,
as the command cuts them), once in this process (1 worker) and once on shards in worker
processes (`--workers`, default 2), alternated `--rounds` times (1 W 1 W ...: load from other
processes hits both alike). Reported: the median wall time of each, their ratio (issue 13's
bar: at most 0.65 with 2 workers on a 2-core machine), and whether every range, per-channel
mean and per-channel range of the two is identical (==, not close).

    .venv/bin/python bench/calibration_workers.py                      # ppocr-v4-rec, 256 samples
    .venv/bin/python bench/calibration_workers.py --method entropy --rounds 5 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BAR = 0.65


def _write_calibration(name: str, n: int, path: Path) -> None:
    import numpy as np

    from models import data

    if path.exists():
        return
    feeds = data.feeds_for(name, "calib", n)
    data.save_npz({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}, path)


def _statistics(model, path: Path, method: str, workers: int):
    """The int8 stage's statistics pass (`onnxshrink.rules.int8.quantize_int8`, 3)."""
    from onnxshrink.quant.calibration import calibration_feeds, collect_statistics
    from onnxshrink.quant.sensitivity import DEFAULT_SAMPLES, ErrorReference
    from onnxshrink.quant.targets import target_profile
    from onnxshrink.rules.int8 import _smoothable
    from onnxshrink.rules.qdq import activation_tensors, bias_correction_axes

    target = "ort-cpu"
    reference = ErrorReference(model, DEFAULT_SAMPLES)
    stats = collect_statistics(
        model,
        activation_tensors(model, target),
        calibration_feeds(path, model),
        method=method,
        symmetric=target_profile(target).symmetric_activations,
        mean_axes=bias_correction_axes(model, target),
        channel_ranges=_smoothable(model, target, ()),
        on_run=reference.record,
        on_run_samples=reference.samples,
        workers=workers,
    )
    reference.check()
    return stats, reference


def _identical(a, b) -> bool:
    import numpy as np

    return (
        a.ranges == b.ranges
        and a.runs == b.runs
        and a.channel_means.keys() == b.channel_means.keys()
        and all(np.array_equal(v, b.channel_means[k]) for k, v in a.channel_means.items())
        and a.channel_ranges.keys() == b.channel_ranges.keys()
        and all(
            np.array_equal(lo, b.channel_ranges[k][0])
            and np.array_equal(hi, b.channel_ranges[k][1])
            for k, (lo, hi) in a.channel_ranges.items()
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocr-v4-rec")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "calib_workers")
    ns = parser.parse_args(argv)

    import onnxshrink
    from onnxshrink.engine.io import available_cpus
    from onnxshrink.rules.qdq import prepare_model

    ns.work.mkdir(parents=True, exist_ok=True)
    calib = ns.work / f"{ns.model}-{ns.samples}.npz"
    print(f"writing {ns.samples} calibration samples to {calib} ...", file=sys.stderr)
    _write_calibration(ns.model, ns.samples, calib)
    source = REPO / "models" / "zoo" / f"{ns.model}.onnx"
    model, _ = prepare_model(onnxshrink.optimize(source, None).model)

    _statistics(model, calib, ns.method, 1)  # warm: page cache, imports, ORT's first session
    seconds: dict[int, list[float]] = {1: [], ns.workers: []}
    results = {}
    for round_ in range(ns.rounds):
        order = (1, ns.workers) if round_ % 2 == 0 else (ns.workers, 1)
        for workers in order:
            start = time.perf_counter()
            stats, reference = _statistics(model, calib, ns.method, workers)
            seconds[workers].append(time.perf_counter() - start)
            results[workers] = (stats, reference)
            print(
                f"round {round_}: {workers} worker(s) {seconds[workers][-1]:.2f} s", file=sys.stderr
            )
    one, many = results[1][0], results[ns.workers][0]
    same = _identical(one, many)
    same_reference = len(results[1][1].feeds) == len(results[ns.workers][1].feeds)
    median = {w: statistics.median(s) for w, s in seconds.items()}
    ratio = median[ns.workers] / median[1]
    report = {
        "model": ns.model,
        "samples": ns.samples,
        "runs": one.runs,
        "method": ns.method,
        "tensors": len(one.ranges),
        "cpus": available_cpus(),
        "load_average": os.getloadavg(),
        "seconds": {str(w): [round(x, 3) for x in s] for w, s in seconds.items()},
        "median_s": {str(w): round(m, 3) for w, m in median.items()},
        "ratio": round(ratio, 3),
        "bar": BAR,
        "identical": same,
        "reference_runs_equal": same_reference,
    }
    print(json.dumps(report, indent=2))
    print(
        f"{ns.model}, {ns.samples} samples, {ns.method}: {ns.workers} workers take "
        f"{ratio:.2f}x the wall time of 1 (bar {BAR}); statistics "
        f"{'identical' if same else 'DIFFER'}",
        file=sys.stderr,
    )
    return 0 if same and ratio <= BAR else 1


if __name__ == "__main__":
    raise SystemExit(main())
