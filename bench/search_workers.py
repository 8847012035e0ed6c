"""The sensitivity ranking's fan-out (`optimize --search-workers N`, issue 13): the whole command.

For each zoo model, `onnxshrink optimize MODEL --quantize int8 --calibration-data calib.npz`
(N calibration samples from the model's calibration split, `models/data.py`; a folder of
.npz files when their shapes differ) runs as a whole
process with `--search-workers 1` and with `--search-workers W`, alternated `--rounds` times
(1 W W 1 1 W ...: load from other processes hits both alike). Reported per model: the median
wall time of the command and of its sensitivity phase (the `--json` report's
`phase_seconds`), their ratios W/1, and whether the written models are byte-identical.

    .venv/bin/python bench/search_workers.py                                  # ppocr-v4-rec
    .venv/bin/python bench/search_workers.py --models ppocr-v4-rec ppocr-v5-det --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _calibration(name: str, n: int, work: Path) -> Path:
    """`n` calibration samples of zoo model `name`: one .npz, or a folder of .npz files
    when their shapes differ (text lines of their own widths). Made once per work folder."""
    import numpy as np

    from models import data

    npz, folder = work / f"{name}-{n}.npz", work / f"{name}-{n}"
    for path in (npz, folder):
        if path.exists():
            return path
    feeds = data.feeds_for(name, "calib", n)
    if all(f[k].shape == feeds[0][k].shape for f in feeds for k in f):
        data.save_npz({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}, npz)
        return npz
    data.save_npz(feeds, folder)
    return folder


def _run(model: Path, calib: Path, workers: int, work: Path) -> tuple[float, float, str]:
    """(wall seconds, sensitivity seconds, sha256 of the written model) of one command."""
    out, report = work / f"{model.stem}.w{workers}.onnx", work / f"{model.stem}.w{workers}.json"
    command = [
        str(Path(sys.executable).with_name("onnxshrink")),
        "optimize", str(model), "-o", str(out), "--quantize", "int8",
        "--calibration-data", str(calib), "--search-workers", str(workers),
        "--json", str(report),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    phases = json.loads(report.read_text())["phase_seconds"]
    return (
        seconds,
        float(phases.get("sensitivity", 0.0)),
        hashlib.sha256(out.read_bytes()).hexdigest(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocr-v4-rec"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "search_workers")
    ns = parser.parse_args(argv)
    ns.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ns.models:
        model = REPO / "models" / "zoo" / f"{name}.onnx"
        calib = _calibration(name, ns.samples, ns.work)
        wall: dict[int, list[float]] = {1: [], ns.workers: []}
        phase: dict[int, list[float]] = {1: [], ns.workers: []}
        digests: dict[int, set[str]] = {1: set(), ns.workers: set()}
        for round_ in range(ns.rounds):
            order = (1, ns.workers) if round_ % 2 == 0 else (ns.workers, 1)
            for workers in order:
                seconds, sensitivity, digest = _run(model, calib, workers, ns.work)
                wall[workers].append(seconds)
                phase[workers].append(sensitivity)
                digests[workers].add(digest)
                print(
                    f"{name} round {round_}: {workers} worker(s) {seconds:.1f} s "
                    f"(sensitivity {sensitivity:.1f} s)",
                    file=sys.stderr,
                )
        one, many = statistics.median(wall[1]), statistics.median(wall[ns.workers])
        p_one, p_many = statistics.median(phase[1]), statistics.median(phase[ns.workers])
        rows.append(
            {
                "model": name,
                "command_s": {"1": round(one, 2), str(ns.workers): round(many, 2)},
                "command_ratio": round(many / one, 3),
                "sensitivity_s": {"1": round(p_one, 2), str(ns.workers): round(p_many, 2)},
                "sensitivity_ratio": round(p_many / p_one, 3) if p_one else None,
                "identical": len(digests[1] | digests[ns.workers]) == 1,
            }
        )
    print(
        json.dumps(
            {
                "samples": ns.samples,
                "workers": ns.workers,
                "rounds": ns.rounds,
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "models": rows,
            },
            indent=2,
        )
    )
    print(f"\n{'model':<16} {'command W/1':>12} {'sensitivity W/1':>16} {'identical':>10}")
    for row in rows:
        print(
            f"{row['model']:<16} {row['command_ratio']:>11.2f}x "
            f"{row['sensitivity_ratio'] or 0:>15.2f}x {str(row['identical']):>10}"
        )
    return 0 if all(row["identical"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
