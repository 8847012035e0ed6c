"""Fleet mode on the whole zoo (`onnxshrink optimize-many`, issue 13): the same files as alone.

Every command runs as users run it, a whole process:

1. `onnxshrink optimize MODEL -o alone/<stem>.opt.onnx` for each zoo model, one after another;
2. `onnxshrink optimize-many 'zoo/*.onnx' --out pool --workers W`, then the same command again
   (the rerun: every model skipped);
3. the same with `--ray` (a local Ray instance of W CPUs), when the `ray` extra is installed.

Every command gets `--allow-unverified` (a model whose parity run needs `--input-shape` is
written too, as optimize writes it) plus whatever follows `--`. Printed: per model, whether the
pool's and Ray's files are byte-identical (sha256) to the one written alone; then the wall
time of each run and rerun, and the manifest's line count.

    .venv/bin/python bench/fleet_zoo.py                 # --workers 2, pool and Ray
    .venv/bin/python bench/fleet_zoo.py --no-ray -- --opset 17
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "models" / "zoo"
CLI = str(Path(sys.executable).with_name("onnxshrink"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(f"{' '.join(command)}: exit {done.returncode}\n{tail}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="the local pool only")
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="fleet-zoo-")))
    ns = parser.parse_args(argv)
    models = sorted(ZOO.glob("*.onnx"))
    if not models:
        raise SystemExit(f"no models in {ZOO}: run `make models`")
    options = ["--allow-unverified", *extra]
    alone_dir = ns.work / "alone"
    alone_dir.mkdir(parents=True, exist_ok=True)
    alone_s = 0.0
    for model in models:
        out = alone_dir / f"{model.stem}.opt.onnx"
        alone_s += _timed([CLI, "optimize", str(model), "-o", str(out), *options])
        print(f"alone: {model.name}", file=sys.stderr)
    runs: dict[str, dict[str, float]] = {}
    backends = {"pool": ["--workers", str(ns.workers)]}
    if not ns.no_ray and importlib.util.find_spec("ray") is not None:
        backends["ray"] = ["--ray", "--workers", str(ns.workers)]
    for name, flags in backends.items():
        command = [CLI, "optimize-many", str(ZOO / "*.onnx"), "--out", str(ns.work / name)]
        command += [*flags, *options]
        runs[name] = {"run": _timed(command), "rerun": _timed(command)}
        print(
            f"{name}: {runs[name]['run']:.1f} s, rerun {runs[name]['rerun']:.1f} s", file=sys.stderr
        )
    identical = True
    print(f"\n{'model':<24}" + "".join(f" {name + ' = alone':>14}" for name in backends))
    for model in models:
        want = _sha(alone_dir / f"{model.stem}.opt.onnx")
        same = [_sha(ns.work / name / f"{model.stem}.opt.onnx") == want for name in backends]
        identical &= all(same)
        print(f"{model.name:<24}" + "".join(f" {str(s):>14}" for s in same))
    print(f"\n{len(models)} models; optimize alone, one after another: {alone_s:.1f} s")
    for name, seconds in runs.items():
        lines = len((ns.work / name / "manifest.jsonl").read_text().splitlines())
        print(
            f"optimize-many {' '.join(backends[name])}: {seconds['run']:.1f} s "
            f"({seconds['run'] / alone_s:.2f}x of alone), rerun {seconds['rerun']:.1f} s, "
            f"manifest {lines} lines"
        )
    print(f"all identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
