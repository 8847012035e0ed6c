"""Structured pruning (FFN neurons and attention heads) of a BERT-style encoder (all-MiniLM-L6-v2).

Usage: `.venv/bin/python bench/prune_minilm.py [--ratio R] [--calib N] [--eval N] [--runs N]
[--max-error X] [--json F]`

Rows, each produced by the whole command users run:

1. `fp32`: models/zoo/minilm-l6.onnx.
2. `channels:R`: `onnxshrink optimize MODEL -o OUT --sparsify channels:R --calibration-data
   calib.npz [--max-error X]`, calib.npz holding `--calib` tokenized sentences of
   models/data.py's `calib` split along axis 0 (heads and FFN neurons removed, each block's
   output projection refit to the original's outputs on those sentences).
3. `channels:R, no reconstruction`: the same with `--no-reconstruct` (the pruning alone).
4. `channels:R + int8`: `--sparsify channels:R --quantize int8` (pruned, then quantized).

Columns, on `--eval` held-out sentences (the `eval` split, disjoint from calibration) in
batches of 16: embedding cosine with fp32 (mean / min), nearest-neighbour agreement (all
queries, and the decided ones: fp32's neighbour leads the second by >= 0.01 cosine), latency
at batch 1 x 128 tokens (median of `--runs` interleaved rounds, 2 threads) and file size, both
as ratios to fp32. Issue 11's bars (>= 1.3x faster, cosine >= 0.97) are checked below the
table for the reconstructed row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from quantize_minilm import SOURCE, _run, measure_rows, print_rows, sentence_data  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--max-error", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    spec = f"channels:{args.ratio:g}"
    budget = [] if args.max_error is None else ["--max-error", str(args.max_error)]
    variants = {
        spec: [],
        f"{spec}, no reconstruction": ["--no-reconstruct"],
        f"{spec} + int8": ["--quantize", "int8"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calib, batches = sentence_data(folder, args.calib, args.eval)
        paths = {"fp32": SOURCE}
        seconds: dict[str, float] = {}
        for i, (name, extra) in enumerate(variants.items()):
            paths[name] = folder / f"pruned{i}.onnx"
            seconds[name] = _run(
                ["optimize", str(SOURCE), "-o", str(paths[name]), "--sparsify", spec,
                 "--calibration-data", str(calib), *budget, *extra]
            )  # fmt: skip
        rows, latency = measure_rows(paths, batches, args.runs, seconds)

    print(
        f"all-MiniLM-L6-v2, --sparsify {spec}: {args.eval} held-out sentences, {args.calib} "
        f"calibration sentences, latency at batch 1 x 128 tokens (fp32 {latency['fp32']:.2f} ms, "
        f"median of {args.runs} interleaved rounds, 2 threads)"
        + ("" if args.max_error is None else f", --max-error {args.max_error:g}")
    )
    print()
    print_rows(rows)
    print()
    for r in rows:
        if r["model"] != spec:
            continue
        speedup = 1 / r["latency"]
        checks = {
            f">= 1.3x faster ({speedup:.2f}x)": speedup >= 1.3,
            "cosine >= 0.97": r["cos_mean"] >= 0.97,
        }
        shown = ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in checks.items())
        print(f"{r['model']} against issue 11's bars: {shown}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
