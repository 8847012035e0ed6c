"""Unstructured 50% pruning of a BERT-style encoder (all-MiniLM-L6-v2): criteria side by side.

Usage: `.venv/bin/python bench/sparsify_minilm.py [--ratio R] [--calib N] [--eval N]
[--max-error X] [--rows magnitude,global-magnitude,wanda,sparsegpt,auto] [--json F]`

Each pruned row is `onnxshrink.rules.sparsify_weights.SparsifyStage("unstructured",
criterion)` run on models/zoo/minilm-l6.onnx with `StageSettings(sparsity=unstructured:R,
max_error=X)`, its result packed by `compress_weights` (what `--compress` does), and a calib.npz of `--calib` tokenized sentences of
models/data.py's `calib` split (the stage is run directly, not through `onnxshrink.optimize`,
because only the stage takes a forced criterion). `--max-error` defaults to 1e9: every unit
pruned, the raw criterion compared; give 0.05 (the stages' default) to see the budget at work.

Rows:

1. `fp32`: the original.
2. `magnitude`: |W|, each layer its own 50% (tables: each row its own 50%).
3. `global-magnitude`: one |W| threshold over every pruned weight (Han et al. 2015).
4. `wanda`: |W| * ||x_j|| per output (Sun et al. 2023); tables by magnitude.
5. `sparsegpt`: SparseGPT's OBS mask and error-compensating update (Frantar & Alistarh 2023).
6. `data-aware`: the stage's default with real data: per layer the better of wanda and
   sparsegpt by output error on the budget's 32 samples (kept out of the fit).

Columns, on `--eval` held-out sentences of the `eval` split (disjoint from calibration), in
batches of 16 padded per batch:

7. `cos mean / min`: cosine between each sentence's embedding (mean of last_hidden_state over
   its real tokens, L2-normalized) and fp32's.
8. `NN agree`: share of sentences whose nearest neighbour among the others is fp32's.
9. `zeros`: share of zero values among all the model's float initializers.
10. `dense` / `dense gz`: the pruned model stored dense, its file and its gzip -6 over fp32's
    file (fp32's own gzip ratio in its row).
11. `packed` / `packed gz`: the `--compress` form (pruned weights as bit mask + values, or
    sparse initializers where smaller), file and gzip over fp32's file; `= dense` says its
    outputs on every held-out batch equal the dense pruned model's bit for bit (ORT CPU).
12. `made in`: seconds of the stage run (statistics, fit, budget, packing).
13. `command, --compress --max-error X`: the whole command users run, `onnxshrink optimize
    MODEL -o OUT --sparsify unstructured:R --compress --calibration-data calib.npz
    --max-error X` (`--command-max-error`, default 0.15): the budget keeps the layers whose
    pruning costs the most error per byte saved dense; its file is the packed one.

The issue's bars (issue 11): packed size <= 0.6x fp32, cosine >= 0.95, the data-aware row's
cosine above magnitude's; checked under the table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from quantize_minilm import SOURCE, _embeddings, _neighbours, _run, sentence_data  # noqa: E402

from onnxshrink.quant.lossy import StageSettings  # noqa: E402
from onnxshrink.quant.sparsity import SparsifySpec  # noqa: E402
from onnxshrink.rules.sparsify_weights import SparsifyStage, compress_weights  # noqa: E402

ROWS = ("magnitude", "global-magnitude", "wanda", "sparsegpt", "auto")


def _gzip_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=6))


def _zeros(model: onnx.ModelProto) -> float:
    total = zeros = 0
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            a = onnx.numpy_helper.to_array(t)
            total += a.size
            zeros += int(np.sum(a == 0))
    return zeros / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--max-error", type=float, default=1e9)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--command-max-error", type=float, default=0.15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = SparsifySpec.parse(f"unstructured:{args.ratio}")
    # compress=False here: the stage's dense result is measured, then packed as --compress does
    settings = StageSettings(sparsity=spec, max_error=args.max_error, compress=False)
    model = onnx.load(str(SOURCE))
    fp32_size = SOURCE.stat().st_size
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calib, batches = sentence_data(folder, args.calib, args.eval)
        reference = _embeddings(SOURCE, batches)
        neighbours = _neighbours(reference)
        rows.append(
            {
                "model": "fp32",
                "cos_mean": 1.0,
                "cos_min": 1.0,
                "nn_agree": 1.0,
                "zeros": _zeros(model),
                "dense": 1.0,
                "dense_gz": _gzip_size(SOURCE) / fp32_size,
                "packed": None,
                "packed_gz": None,
                "equal": None,
                "seconds": None,
                "notes": [],
            }
        )
        for criterion in args.rows.split(","):
            start = time.perf_counter()
            stage = SparsifyStage("unstructured", criterion)
            result = stage.run(model, str(calib), settings)
            dense = result.model
            # the --compress form, as the stage stores it (each weight packed where smaller)
            packed, _ = compress_weights(dense, [t.name for t in dense.graph.initializer])
            seconds = time.perf_counter() - start
            packed_path = folder / f"{criterion}.packed.onnx"
            onnx.save(packed, str(packed_path))
            dense_path = folder / f"{criterion}.dense.onnx"
            onnx.save(dense, str(dense_path))
            emb = _embeddings(dense_path, batches)
            packed_emb = _embeddings(packed_path, batches)
            cos = np.sum(emb * reference, axis=1)
            rows.append(
                {
                    "model": "data-aware" if criterion == "auto" else criterion,
                    "cos_mean": float(cos.mean()),
                    "cos_min": float(cos.min()),
                    "nn_agree": float(np.mean(_neighbours(emb) == neighbours)),
                    "zeros": _zeros(dense),
                    "dense": dense_path.stat().st_size / fp32_size,
                    "dense_gz": _gzip_size(dense_path) / fp32_size,
                    "packed": packed_path.stat().st_size / fp32_size,
                    "packed_gz": _gzip_size(packed_path) / fp32_size,
                    "equal": bool(np.array_equal(emb, packed_emb)),
                    "seconds": seconds,
                    "declined": len(result.kept_float),
                    "notes": result.notes,
                }
            )
            print(f"{criterion}: {rows[-1]}", file=sys.stderr, flush=True)
        # the whole command, as users run it: the budget chooses which layers stay dense
        out = folder / "command.onnx"
        seconds = _run(
            ["optimize", str(SOURCE), "-o", str(out), "--sparsify", spec.describe(),
             "--compress", "--calibration-data", str(calib), "--no-verify",
             "--max-error", str(args.command_max_error)]
        )  # fmt: skip
        emb = _embeddings(out, batches)
        cos = np.sum(emb * reference, axis=1)
        rows.append(
            {
                "model": f"command, --compress --max-error {args.command_max_error:g}",
                "cos_mean": float(cos.mean()),
                "cos_min": float(cos.min()),
                "nn_agree": float(np.mean(_neighbours(emb) == neighbours)),
                "zeros": None,
                "dense": None,
                "dense_gz": None,
                "packed": out.stat().st_size / fp32_size,
                "packed_gz": _gzip_size(out) / fp32_size,
                "equal": None,
                "seconds": seconds,
                "declined": None,
                "notes": [],
            }
        )
    _print(rows, spec.describe(), args)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


def _print(rows: list[dict[str, Any]], spec: str, args: argparse.Namespace) -> None:
    print(
        f"\nall-MiniLM-L6-v2, {spec}, {args.calib} calibration / {args.eval} held-out "
        f"sentences, max_error {args.max_error:g}\n"
    )
    print(
        "| model | cos mean / min | NN agree | zeros | dense | dense gz | packed | packed gz "
        "| = dense | made in |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}x"

    for r in rows:
        made = "-" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        equal = "-" if r["equal"] is None else ("yes" if r["equal"] else "NO")
        print(
            f"| {r['model']} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | "
            f"{r['nn_agree'] * 100:.1f}% | "
            + ("-" if r["zeros"] is None else f"{r['zeros'] * 100:.1f}%")
            + f" | {ratio(r['dense'])} | "
            f"{ratio(r['dense_gz'])} | {ratio(r['packed'])} | {ratio(r['packed_gz'])} | "
            f"{equal} | {made} |"
        )
    by = {r["model"]: r for r in rows}
    print()
    for r in rows[1:]:
        print(
            f"- {r['model']}: packed {r['packed']:.3f}x <= 0.6x: "
            f"{'yes' if r['packed'] <= 0.6 else 'NO'}; cosine {r['cos_mean']:.4f} >= 0.95: "
            f"{'yes' if r['cos_mean'] >= 0.95 else 'NO'}"
            + ("" if r["declined"] is None else f"; {r['declined']} unit(s) kept dense")
        )
    if "data-aware" in by and "magnitude" in by:
        better = by["data-aware"]["cos_mean"] > by["magnitude"]["cos_mean"]
        print(f"- data-aware beats magnitude: {'yes' if better else 'NO'}")
    for r in rows[1:]:
        for note in r["notes"]:
            print(f"  - {r['model']}: {note}")


__all__ = ["main"]

if __name__ == "__main__":
    main()
