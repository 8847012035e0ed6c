"""int8 and fp16 on a BERT-style encoder (all-MiniLM-L6-v2), side by side with ORT's tool.

Usage: `.venv/bin/python bench/quantize_minilm.py [--calib N] [--eval N] [--runs N] [--json F]`

Rows, each produced the way its users produce it:

1. `fp32`: models/zoo/minilm-l6.onnx.
2. `lossless`: `onnxshrink optimize MODEL -o OUT` (the whole command).
3. `ORT dynamic`: onnxruntime's `quantize_dynamic(fp32, out)` with its defaults (MatMulInteger,
   per-tensor uint8 weights), the usual CPU recipe for transformers.
4. `ORT dynamic per-channel`: the same with `per_channel=True`.
5. `onnxshrink int8`: `onnxshrink optimize MODEL -o OUT --quantize int8 --calibration-data
   calib.npz` (the whole command, timed), calib.npz holding `--calib` tokenized sentences of
   models/data.py's `calib` split along axis 0, padded to the longest.
6. `onnxshrink fp16`: the same with `--quantize fp16` (on ORT CPU most fp16 ops run through
   inserted Casts, so its latency here says nothing about a GPU).

Columns, on `--eval` held-out sentences (the `eval` split, disjoint from calibration), in
batches of 16 padded per batch:

7. `cos mean / min`: cosine between each sentence's embedding (mean of last_hidden_state over
   its real tokens, L2-normalized) and fp32's.
8. `NN agree`: share of sentences whose nearest neighbour among the others (by embedding
   cosine) is the one fp32 picks; `decided`: the same over the sentences whose fp32 nearest
   neighbour leads the second nearest by at least 0.01 cosine (`DECIDED_MARGIN`).
9. `latency`: median over `--runs` interleaved rounds (every session once a round, the order
   rotating), batch 1, sequence 128 (a real 128-token input), 2 intra-op threads, spinning
   off; shown as the ratio to fp32.
10. `size`: the file over fp32's.
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
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models import data  # noqa: E402

ZOO = REPO / "models" / "zoo"
SOURCE = ZOO / "minilm-l6.onnx"
CLI = [sys.executable, "-m", "onnxshrink"]


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _embeddings(path: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = _session(path)
    names = {i.name for i in session.get_inputs()}
    out = []
    for feed in batches:
        hidden = session.run(None, {k: v for k, v in feed.items() if k in names})[0]
        out.append(data.sentence_embeddings(hidden, feed["attention_mask"]))
    return np.concatenate(out)


def _neighbours(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -2.0)
    return sim.argmax(axis=1)


#: a query is "decided" when fp32's nearest neighbour leads the runner-up by at least this
#: much cosine; below it, rounding noise of any integer format can swap the two
DECIDED_MARGIN = 0.01


def neighbour_margins(emb: np.ndarray) -> np.ndarray:
    """Per query, the cosine by which its nearest neighbour leads the second nearest."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -2.0)
    top2 = np.sort(sim, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _latency_feed() -> dict[str, np.ndarray]:
    """One 128-token input: held-out sentences joined until the tokenizer truncates at 128."""
    text = " ".join(data.corpus_sentences("eval")[:40])
    feed = data.tokenize([text], ZOO, max_length=128)
    assert feed["input_ids"].shape == (1, 128), feed["input_ids"].shape
    return feed


def _time(paths: dict[str, Path], runs: int) -> dict[str, float]:
    feed = _latency_feed()
    sessions = {}
    for name, path in paths.items():
        s = _session(path)
        names = {i.name for i in s.get_inputs()}
        f = {k: v for k, v in feed.items() if k in names}
        s.run(None, f)
        s.run(None, f)
        sessions[name] = (s, f)
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for r in range(runs):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            s, f = sessions[name]
            start = time.perf_counter()
            s.run(None, f)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def sentence_data(
    folder: Path, n_calib: int, n_eval: int
) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """`folder/calib.npz`: the first `n_calib` sentences of the `calib` split, tokenized along
    axis 0; and the first `n_eval` of the `eval` split in batches of 16, padded per batch."""
    calib = folder / "calib.npz"
    data.save_npz(data.tokenize(data.corpus_sentences("calib")[:n_calib], ZOO), calib)
    held_out = data.corpus_sentences("eval")[:n_eval]
    return calib, [data.tokenize(held_out[i : i + 16], ZOO) for i in range(0, len(held_out), 16)]


def print_rows(rows: list[dict[str, Any]]) -> None:
    """`measure_rows`' rows as a Markdown table."""
    print("| model | cos mean / min | NN agree | NN agree, decided | latency | size | made in |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        made = "-" if r["seconds"] is None else f"{r['seconds']:.1f} s"
        print(
            f"| {r['model']} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | "
            f"{r['nn_agree'] * 100:.1f}% | {r['nn_agree_decided'] * 100:.1f}% | "
            f"{r['latency']:.2f}x | {r['size']:.3f}x | {made} |"
        )


def measure_rows(
    paths: dict[str, Path],
    batches: list[dict[str, np.ndarray]],
    runs: int,
    seconds: dict[str, float],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per model (`paths`, fp32 first): embedding cosine and nearest-neighbour
    agreement with fp32 on `batches`, latency (`_time`) and file size as ratios to fp32; and
    the latencies in ms."""
    reference = _embeddings(SOURCE, batches)
    neighbours = _neighbours(reference)
    decided = neighbour_margins(reference) >= DECIDED_MARGIN
    latency = _time(paths, runs)
    rows: list[dict[str, Any]] = []
    for name, path in paths.items():
        emb = reference if name == "fp32" else _embeddings(path, batches)
        cos = np.sum(emb * reference, axis=1)
        agree = _neighbours(emb) == neighbours
        rows.append(
            {
                "model": name,
                "cos_mean": float(cos.mean()),
                "cos_min": float(cos.min()),
                "nn_agree": float(np.mean(agree)),
                "nn_agree_decided": float(np.mean(agree[decided])),
                "decided": float(np.mean(decided)),
                "latency_ms": latency[name],
                "latency": latency[name] / latency["fp32"],
                "size": path.stat().st_size / SOURCE.stat().st_size,
                "seconds": seconds.get(name),
            }
        )
    return rows, latency


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"onnxshrink {' '.join(args)} failed: {proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calib, batches = sentence_data(folder, args.calib, args.eval)

        paths = {"fp32": SOURCE}
        seconds: dict[str, float] = {}
        paths["lossless"] = folder / "lossless.onnx"
        seconds["lossless"] = _run(["optimize", str(SOURCE), "-o", str(paths["lossless"])])
        paths["ORT dynamic"] = folder / "ort_dynamic.onnx"
        start = time.perf_counter()
        quantize_dynamic(str(SOURCE), str(paths["ORT dynamic"]), weight_type=QuantType.QUInt8)
        seconds["ORT dynamic"] = time.perf_counter() - start
        paths["ORT dynamic per-channel"] = folder / "ort_dynamic_pc.onnx"
        start = time.perf_counter()
        quantize_dynamic(str(SOURCE), str(paths["ORT dynamic per-channel"]), per_channel=True)
        seconds["ORT dynamic per-channel"] = time.perf_counter() - start
        for stage in ("int8", "fp16"):
            name = f"onnxshrink {stage}"
            paths[name] = folder / f"{stage}.onnx"
            seconds[name] = _run(
                ["optimize", str(SOURCE), "-o", str(paths[name]), "--quantize", stage,
                 "--calibration-data", str(calib)]
            )  # fmt: skip

        rows, latency = measure_rows(paths, batches, args.runs, seconds)

    print(
        f"all-MiniLM-L6-v2: {args.eval} held-out sentences, {args.calib} calibration sentences, "
        f"latency at batch 1 x 128 tokens (fp32 {latency['fp32']:.2f} ms, median of {args.runs} "
        "interleaved rounds, 2 threads)"
    )
    print()
    print_rows(rows)
    ours = next(r for r in rows if r["model"] == "onnxshrink int8")
    bars = ours["cos_mean"] >= 0.99 and ours["latency"] <= 0.7 and ours["size"] <= 0.3
    print()
    print(
        f"onnxshrink int8 against issue 8's bars (cosine >= 0.99, latency <= 0.7x, file <= 0.3x): "
        f"{'met' if bars else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
