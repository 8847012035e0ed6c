"""int4 weights on a BERT-style encoder (all-MiniLM-L6-v2), side by side with ORT's tool.

Usage: `.venv/bin/python bench/int4_minilm.py [--calib N] [--eval N] [--runs N] [--block N]
[--max-error X] [--json F]`

Rows, each produced the way its users produce it:

1. `fp32`: models/zoo/minilm-l6.onnx.
2. `ORT RTN`: onnxruntime's `MatMulNBitsQuantizer` with its default (round-to-nearest,
   asymmetric) configuration at `--block`, MatMul and Gather quantized
   (`op_types_to_quantize=("MatMul", "Gather")`), accuracy_level unset.
3. `ORT HQQ`: the same with `HQQWeightOnlyQuantConfig`, MatMul only (its Gather
   quantization raises NotImplementedError; needs torch, skipped without it).
4. `onnxshrink int4 rtn` / `gptq`: `onnxshrink optimize MODEL -o OUT --quantize int4
   --int4-method M --block-size B [--max-error X] --calibration-data calib.npz` (the whole
   command, timed), calib.npz holding `--calib` tokenized sentences of models/data.py's
   `calib` split, at `--accuracy-level 4` (the default: MatMulNBits on int8 activations) and
   gptq also at 0 (float activations).
5. `onnxshrink int4 gptq (tensorrt)`: the same with `--target tensorrt` (standard opset-21
   blocked DequantizeLinear), run here on stock ORT CPU.
6. `onnxshrink int8+int4 gptq`: `--quantize int8+int4` (int4 first, then static int8 on the
   layers left float where it is faster, half of the budget each).
7. `onnxshrink int8 (reference)`: `--quantize int8` with the same data, to show how much of
   the NN figure any integer format loses on this sentence set.

Columns, on `--eval` held-out sentences (the `eval` split, disjoint from calibration; the
first 256 run from 9 to 40 tokens, 16 on average), in batches of 16 padded per batch:

8. `cos mean / min`: cosine between each sentence's embedding (mean of last_hidden_state over
   its real tokens, L2-normalized) and fp32's.
9. `NN agree`: share of sentences whose nearest neighbour among the others is fp32's;
   `decided`: the same over the sentences whose fp32 nearest neighbour leads the second by
   at least 0.01 cosine (the header says what share that is).
10. `latency`: median over `--runs` interleaved rounds, batch 1, sequence 128, 2 intra-op
   threads, spinning off; the ratio to fp32.
11. `size`: the file over fp32's.

Issue 10's bars are checked under the table for every onnxshrink row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from quantize_minilm import (  # noqa: E402
    DECIDED_MARGIN,
    SOURCE,
    _run,
    measure_rows,
    print_rows,
    sentence_data,
)

#: onnxshrink's rows: (--quantize, method, target, MatMulNBits accuracy_level)
OURS = (
    ("int4", "gptq", "ort-cpu", 4),
    ("int4", "gptq", "ort-cpu", 0),
    ("int4", "rtn", "ort-cpu", 4),
    ("int4", "gptq", "tensorrt", 4),
    ("int8+int4", "gptq", "ort-cpu", 4),
)


def _ort_quantizer(source: Path, out: Path, block: int, hqq: bool) -> float:
    """ORT's MatMulNBitsQuantizer on MatMul and Gather; seconds it took."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)  # one INFO line per node

    start = time.perf_counter()
    model = onnx.load(str(source))
    ops = ("MatMul",) if hqq else ("MatMul", "Gather")  # HQQ does not take Gather
    config = (
        mnq.HQQWeightOnlyQuantConfig(block_size=block, op_types_to_quantize=ops)
        if hqq
        else mnq.DefaultWeightOnlyQuantConfig(block_size=block, op_types_to_quantize=ops)
    )
    quantizer = mnq.MatMulNBitsQuantizer(
        model, block_size=block, op_types_to_quantize=ops, algo_config=config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--max-error", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calib, batches = sentence_data(folder, args.calib, args.eval)

        paths = {"fp32": SOURCE}
        seconds: dict[str, float] = {}
        for name, hqq in (("ORT RTN", False), ("ORT HQQ", True)):
            out = folder / f"{name.replace(' ', '_')}.onnx"
            try:
                seconds[name] = _ort_quantizer(SOURCE, out, args.block, hqq)
                paths[name] = out
            except ImportError as exc:  # HQQ needs torch
                print(f"{name}: skipped ({exc})", file=sys.stderr)
        budget = [] if args.max_error is None else ["--max-error", str(args.max_error)]
        for stage, method, target, level in OURS:
            name = f"onnxshrink {stage} {method}" + (
                f", accuracy_level {level}" if target == "ort-cpu" else f" ({target})"
            )
            paths[name] = folder / f"{stage}_{method}_{target}_{level}.onnx"
            seconds[name] = _run(
                ["optimize", str(SOURCE), "-o", str(paths[name]), "--quantize", stage,
                 "--int4-method", method, "--block-size", str(args.block), "--target", target,
                 "--accuracy-level", str(level), "--calibration-data", str(calib), *budget]
            )  # fmt: skip
        name = "onnxshrink int8 (reference)"
        paths[name] = folder / "int8.onnx"
        seconds[name] = _run(
            ["optimize", str(SOURCE), "-o", str(paths[name]), "--quantize", "int8",
             "--calibration-data", str(calib), *budget]
        )  # fmt: skip

        rows, latency = measure_rows(paths, batches, args.runs, seconds)

    print(
        f"all-MiniLM-L6-v2, int4 block {args.block}: {args.eval} held-out sentences, "
        f"{args.calib} calibration sentences, latency at batch 1 x 128 tokens (fp32 "
        f"{latency['fp32']:.2f} ms, median of {args.runs} interleaved rounds, 2 threads)"
        + ("" if args.max_error is None else f", --max-error {args.max_error:g}")
        + f"; fp32's nearest neighbour leads the second by under {DECIDED_MARGIN:g} cosine on "
        f"{(1 - rows[0]['decided']) * 100:.1f}% of the sentences"
    )
    print()
    print_rows(rows)
    print()
    for r in rows:
        if not r["model"].startswith("onnxshrink") or "reference" in r["model"]:
            continue
        checks = {
            "file <= 0.2x": r["size"] <= 0.2,
            "cosine >= 0.99": r["cos_mean"] >= 0.99,
            "NN agree >= 95%": r["nn_agree"] >= 0.95,
            "latency <= 1.0x": r["latency"] <= 1.0,
        }
        shown = ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in checks.items())
        print(f"{r['model']} against issue 10's bars: {shown}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
